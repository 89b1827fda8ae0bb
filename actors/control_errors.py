"""The one error type of the control plane: an operation refused, with an XRPC error name and HTTP status."""

from __future__ import annotations


class ControlError(Exception):
    """An operator request that cannot be done; nothing was changed.

    ``error`` is the XRPC error name the admin API answers, ``status`` its HTTP status (4xx for
    a refused request, 501 for an operation this relay's configuration does not offer).
    """

    def __init__(self, error: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        self.status = status
