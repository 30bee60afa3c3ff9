"""uvicorn's HTTP/1.1 protocol (h11), with the limits a server on a home network needs.

uvicorn leaves three gaps that let clients hold a server without sending a
request: its keep-alive timer starts only after a response, so a connection
that sends nothing, or half a request head (slowloris), or a body after its
413, stays open forever; its connection limit answers in plain text and
serves one fewer than it is given; and malformed HTTP gets a plain-text 400.
Here every connection must have a request in progress within HEAD_TIMEOUT
seconds of opening or of its last response, `max_connections` are served,
and every refusal is an OpenAI error object.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

STATUS_LINES = {400: b"400 Bad Request", 503: b"503 Service Unavailable"}


def error_bytes(status: int, message: str, kind: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    return head % (STATUS_LINES[status], len(body)) + body


def guarded_protocol(max_connections: int, head_timeout: float) -> type:
    """The protocol class to give uvicorn.Config(http=...), with uvicorn's own limit_concurrency left unset."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = None
            if len(self.connections) > max_connections:  # this one included: max_connections are served
                transport.write(error_bytes(503, f"the server has {max_connections} connections open; retry shortly", "server_error"))
                transport.close()
                return
            self._arm_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_deadline()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(head_timeout, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            self._deadline = None
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(error_bytes(400, f"malformed HTTP request: {msg}", "invalid_request_error"))
            self.transport.close()

    return GuardedH11Protocol
