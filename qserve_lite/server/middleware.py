"""The guard in front of the app: the bearer API key (401, /v1 routes only) and the request body's size (413
past max_request_bytes, whether announced by Content-Length or not), checked before anything is parsed.

A pure ASGI middleware: it does not buffer responses, so streaming is untouched.
"""

from __future__ import annotations

import hmac
import json

from qserve_lite.server.errors import APIError, error_body

DEFAULT_MAX_REQUEST_BYTES = 1 << 20


class GuardMiddleware:
    """Checks the bearer key on /v1 routes, then reads the request body up to max_request_bytes and replays
    it to the app."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rejection = self._check_headers(scope["path"], headers)
        replay = None
        if rejection is None:
            replay, rejection = await self._read_body(receive)
        if rejection is not None:
            await self._reject(send, rejection)
            return
        replayed = False

        async def replay_receive():
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()

        await self.app(scope, replay_receive, send)

    def _check_headers(self, path: str, headers: dict[bytes, bytes]) -> APIError | None:
        """The API key, then the announced body size."""
        if self.api_key is not None and path.startswith("/v1"):
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
        announced = headers.get(b"content-length")
        if announced is None:
            return None
        try:
            too_large = int(announced) > self.max_request_bytes
        except ValueError:
            return APIError(400, "invalid Content-Length header")
        return self._too_large() if too_large else None

    async def _read_body(self, receive) -> tuple[dict | None, APIError | None]:
        """(the message to replay to the app: the whole body, or a disconnect that came before the body was
        complete; or the rejection of a body over the limit)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message, None  # a disconnect before the body was complete: let the app see it
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None, self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}, None

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than {self.max_request_bytes} bytes", code="request_too_large"
        )

    @staticmethod
    async def _reject(send, e: APIError) -> None:
        body = json.dumps(error_body(e.status, e.message, code=e.code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": e.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
