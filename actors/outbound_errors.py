"""The typed outcomes of a failed outbound call; messages name the kind of failure, never socket details.

Every outbound call of the relay (``actors.outbound``) fails with one of these. ``kind`` is a
short fixed word, safe as a metric label. ``str(exc)`` says what kind of failure happened
without any OS error text; ``detail`` may carry that text, for the operator's log only.
"""

from __future__ import annotations


class OutboundError(Exception):
    """An outbound request or connection failed; ``kind`` says how."""

    kind = "outbound_error"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class BadUrl(OutboundError):
    """Not an http(s)/ws(s) URL, or a plaintext scheme where only TLS is allowed."""

    kind = "bad_url"


class RefusedAddress(OutboundError):
    """The name resolves to an address the policy refuses (loopback, private, link-local, ...)."""

    kind = "refused_address"


class ResolveFailed(OutboundError):
    """The name does not resolve (no such name, no address, or the resolver failed)."""

    kind = "resolve_failed"


class ConnectFailed(OutboundError):
    """No connection could be made or kept (refused, reset, unreachable, TLS failure)."""

    kind = "connect_failed"


class OutboundTimeout(OutboundError):
    """A read waited longer than the per-read timeout, or the request outlived its deadline."""

    kind = "timeout"


class TooLarge(OutboundError):
    """The body (declared or streamed) is larger than the caller's cap."""

    kind = "too_large"


class BadStatus(OutboundError):
    """The server answered with a status the caller does not accept; ``status`` is it."""

    kind = "bad_status"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ProtocolFailure(OutboundError):
    """The answer is not well-formed HTTP (status line, headers, chunking, length)."""

    kind = "protocol_error"


OUTBOUND_KINDS: tuple[str, ...] = tuple(
    cls.kind
    for cls in (BadUrl, RefusedAddress, ResolveFailed, ConnectFailed, OutboundTimeout, TooLarge, BadStatus,
                ProtocolFailure)
)  # fmt: skip
