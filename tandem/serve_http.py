"""The HTTP layer of ``tandem serve``: the JSON error shape, the body-size limit, and JSON
replies for requests that uvicorn's HTTP parser refuses before the app sees them.

- ``error_body(type, message, **extra)`` is every error reply: ``{"error": {"type", "message", ...}}``.
- ``BodyLimit`` (ASGI middleware) answers 413 for a body over the limit.
- ``uvicorn_config(app, ...)`` is a ``uvicorn.Config`` whose HTTP protocol answers a request
  it cannot parse (``Content-Length: abc``, a malformed request line or header) with a JSON
  400 instead of uvicorn's plain-text one. ``serve`` and the tests run uvicorn with it.
"""

import importlib.util
import json
import re
from typing import Any

try:
    from fastapi.responses import JSONResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"tandem serve needs fastapi and uvicorn: pip install 'tandem[serve]' ({exc})") from exc


def error_body(kind: str, message: str, **extra: Any) -> dict:
    return {"error": {"type": kind, "message": message, **extra}}


# -- body size --------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a 413 for a declared Content-Length over the limit (before the body is
    read) and for a body that turns out longer (chunked uploads); otherwise the app gets the
    body as it came. (A Content-Length that is not a number is a 400 here too, for servers
    that pass one on; uvicorn refuses it earlier, see ``uvicorn_config``.)"""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await self._reply(scope, receive, send, 400, bad_content_length(declared))
                return
            if n > self.max_bytes:
                await self._too_large(scope, receive, send, f"{n} bytes")
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send, f"over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send, size: str) -> None:
        await self._reply(scope, receive, send, 413, error_body(
            "body_too_large", f"the body is {size}; this server accepts at most {self.max_bytes} bytes",
            max_body_bytes=self.max_bytes))

    @staticmethod
    async def _reply(scope, receive, send, status: int, body: dict) -> None:
        await JSONResponse(body, status_code=status)(scope, receive, send)


# -- requests the HTTP parser refuses ---------------------------------------------------------
def bad_content_length(value: bytes) -> dict:
    message = f"Content-Length is not a number: {value.decode('latin-1')[:100]!r}"
    return error_body("invalid_request", message, details=[{"field": "Content-Length", "message": message}])


_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def unparsable_request(data: bytes) -> dict:
    """The error body for a request the HTTP parser refused; ``data`` is the chunk it failed on.
    A Content-Length that is not a whole number is named; anything else gets a general message."""
    for match in _CONTENT_LENGTH.finditer(data):
        value = match.group(1).strip()
        if not value.isdigit():
            return bad_content_length(value)
    return error_body("invalid_request", "the request is not valid HTTP/1.1 (a malformed request line or header)")


class _JSONBadRequest:
    """Mixed into a uvicorn HTTP protocol: its 400 for a request it cannot parse is JSON.

    uvicorn's protocols call ``send_400_response`` from ``data_received`` when the parser
    fails; the chunk that was being parsed is kept to say what was wrong."""

    _last_data = b""

    def data_received(self, data: bytes) -> None:
        self._last_data = data
        super().data_received(data)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(unparsable_request(self._last_data)).encode()
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]  # type: ignore[attr-defined]
        head += [b"content-type: application/json\r\n",
                 b"content-length: " + str(len(body)).encode() + b"\r\n",
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)  # type: ignore[attr-defined]
        self.transport.close()  # type: ignore[attr-defined]


_PROTOCOLS: dict[str, type] = {}


def json_error_protocol(http: str = "auto") -> type:
    """uvicorn's HTTP/1.1 protocol class (``"h11"``, ``"httptools"``, or ``"auto"``: httptools
    when installed, as uvicorn chooses) with JSON 400 replies."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if http not in _PROTOCOLS:
        if http == "h11":
            from uvicorn.protocols.http.h11_impl import H11Protocol as base
        elif http == "httptools":
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        else:
            raise ValueError(f"http must be 'auto', 'h11' or 'httptools', not {http!r}")
        _PROTOCOLS[http] = type(f"JSONErrors{base.__name__}", (_JSONBadRequest, base), {})
    return _PROTOCOLS[http]


def uvicorn_config(app, *, http: str = "auto", **options: Any):
    """``uvicorn.Config(app, **options)`` with the JSON-400 HTTP protocol."""
    import uvicorn

    return uvicorn.Config(app, http=json_error_protocol(http), **options)
