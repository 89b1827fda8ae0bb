"""Request spans: one span per HTTP request (XRPC, admin, firehose upgrade), named by its route.

``install_request_tracing(app)`` adds Flask hooks that do nothing while tracing is off
(``actors.tracing.ENABLED``). With tracing on, ``before_request`` starts a span named
``"<METHOD> <route rule>"`` (``"<METHOD> unmatched"`` for unknown paths, so names stay few) and
makes it current, so spans started while handling the request (admin operations) are its
children; ``after_request`` records the status; ``teardown_request`` ends it. A 5xx sets the
span's status to error. The firehose's span lasts as long as the consumer's connection.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, g, request

from actors import tracing


def install_request_tracing(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_status)
    app.teardown_request(_end)


def _start() -> None:
    if not tracing.ENABLED:
        return
    from opentelemetry import context, trace

    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    span = tracing.start_span(
        f"{request.method} {rule}",
        http_request_method=request.method,
        http_route=rule,
        url_path=request.path,
    )
    g.otel_span = span
    g.otel_token = context.attach(trace.set_span_in_context(span))


def _status(response: Response) -> Response:
    span = g.get("otel_span")
    if span is not None:
        span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 500:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR))
    return response


def _end(exc: BaseException | None) -> Any:
    span = g.pop("otel_span", None)
    if span is None:
        return None
    from opentelemetry import context

    token = g.pop("otel_token", None)
    if exc is not None:
        span.record_exception(exc)
    span.end()
    if token is not None:
        context.detach(token)
    return None
