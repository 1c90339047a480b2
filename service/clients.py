"""Who may call, how much, and how slowly: API keys, per-client token buckets, request read limits.

- `ClientGateMiddleware` guards the public work routes (/recommend, /users/{id}/events) before the
  body is read: API key (X-API-Key; 401 without, 403 wrong) when keys are configured, then the
  client's token bucket (429 with Retry-After). Health, /info, /metrics and the docs stay open.
- `RequestBodyMiddleware` reads a request body whole, within GENREC_MAX_BODY_BYTES (413) and
  GENREC_REQUEST_READ_TIMEOUT_S (408), before the app sees it.
- `BoundedHttpToolsProtocol` (uvicorn's httptools protocol with two limits) cuts a connection whose
  header block passes GENREC_MAX_HEADER_BYTES (431) or is not complete within the read timeout (408):
  before the headers are complete no ASGI app runs, so this is the one place that sees them.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.metrics import ServiceMetrics

API_KEY_HEADER = "X-API-Key"
_API_KEY_HEADER_BYTES = API_KEY_HEADER.lower().encode()

# The routes that do work for a caller: the ones keys and rate limits apply to.
_GUARDED_PATH = re.compile(r"^/(recommend|users/[^/]+/events)/?$")


def is_guarded_path(path: str) -> bool:
    return _GUARDED_PATH.match(path) is not None


def error_body(detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The one error shape of the API (ErrorResponse)."""
    return {"detail": detail, "errors": errors}


# --- API keys -------------------------------------------------------------------------------------

class ApiKeys:
    """The configured keys, held as sha256 digests and compared in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(key.encode()).digest() for key in dict.fromkeys(keys) if key]

    @classmethod
    def from_settings(cls, keys: str, keys_file: Path | None) -> ApiKeys:
        """Comma-separated keys plus one key per line of keys_file (blank lines and # comments skipped)."""
        found = [key.strip() for key in keys.split(",")]
        if keys_file is not None:
            try:
                lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise ValueError(f"GENREC_API_KEYS_FILE {keys_file}: cannot be read ({error.strerror})") from error
            found += [line.strip() for line in lines if not line.lstrip().startswith("#")]
        return cls(key for key in found if key)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        # Every configured key is compared (no early exit), each in constant time.
        return sum(hmac.compare_digest(digest, known) for known in self._digests) > 0


# --- per-client rate limit ------------------------------------------------------------------------

class TokenBuckets:
    """One token bucket per client: `rate_per_s` tokens a second, at most `burst` saved. Bounded in
    clients (least recently seen dropped beyond max_clients; a dropped client starts full again)."""

    def __init__(self, rate_per_s: float, burst: int, *, max_clients: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, updated_at)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, client: str) -> float:
        """Take one token for `client`: 0.0 when allowed, else the seconds until a token is there."""
        now = self._clock()
        tokens, updated_at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated_at) * self.rate_per_s)
        wait_s = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait_s = (1.0 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait_s


class ClientGateMiddleware:
    """API key, then rate limit, on the guarded routes; everything else passes untouched."""

    def __init__(self, app: ASGIApp, api_keys: ApiKeys, buckets: TokenBuckets, metrics: ServiceMetrics) -> None:
        self.app = app
        self.api_keys = api_keys
        self.buckets = buckets
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not is_guarded_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = _header(scope, _API_KEY_HEADER_BYTES)
        if self.api_keys.enabled:
            if key is None:
                self.metrics.rejections.labels(reason="unauthorized").inc()
                await _reject(scope, receive, send, 401, f"this route needs an API key: send it in the {API_KEY_HEADER} "
                              "header", {"WWW-Authenticate": API_KEY_HEADER})
                return
            if not self.api_keys.accepts(key):
                self.metrics.rejections.labels(reason="forbidden").inc()
                await _reject(scope, receive, send, 403, f"the {API_KEY_HEADER} is not a key this service accepts")
                return
        if self.buckets.enabled:
            # Keyed by API key when keys are configured (one client may use several addresses),
            # else by the client's address.
            client = f"key:{key}" if self.api_keys.enabled else f"addr:{(scope.get('client') or ('?', 0))[0]}"
            wait_s = self.buckets.take(client)
            if wait_s > 0:
                self.metrics.rejections.labels(reason="client_rate").inc()
                retry_after = max(1, math.ceil(wait_s))
                await _reject(scope, receive, send, 429,
                              f"this client is over its rate of {self.buckets.rate_per_s:g} requests/s "
                              f"(burst {self.buckets.burst}); retry after {retry_after}s",
                              {"Retry-After": str(retry_after)})
                return
        await self.app(scope, receive, send)


async def _reject(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                  headers: dict[str, str] | None = None) -> None:
    await JSONResponse(error_body(detail), status_code=status, headers=headers)(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


# --- request bodies -------------------------------------------------------------------------------

class RequestBodyMiddleware:
    """Reads the body before the app does: 413 past max_body_bytes (at once when Content-Length says
    so), 408 when it is not all there within read_timeout_s; the app then reads it from memory."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, read_timeout_s: float, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._too_large(scope, receive, send, declared)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        await self._too_large(scope, receive, send, None)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            self.metrics.rejections.labels(reason="read_timeout").inc()
            detail = (f"the request body did not arrive within {self.read_timeout_s:g} s "
                      f"(GENREC_REQUEST_READ_TIMEOUT_S; {size} bytes came); send it whole and promptly")
            await JSONResponse(error_body(detail), status_code=408, headers={"Connection": "close"})(scope, receive, send)
            return
        message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replaying(message, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        self.metrics.rejections.labels(reason="body_too_large").inc()
        got = f"{size} bytes" if size is not None else "more than that"
        detail = (f"request body is {got}; the limit is {self.max_body_bytes} bytes (GENREC_MAX_BODY_BYTES). "
                  "Send fewer history items.")
        await JSONResponse(error_body(detail), status_code=413, headers={"Connection": "close"})(scope, receive, send)


def replaying(message: Message, receive: Receive) -> Receive:
    """A receive that gives the body message already read, then what `receive` gives (disconnect notices)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return message
        return await receive()

    return replay


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# --- the connection: header size and header read time ---------------------------------------------

def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps(error_body(detail)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus: a header block larger than `max_header_bytes` gets 431, one
    not complete within `read_timeout_s` of the request's first byte (of the connection, for the
    first request) gets 408; either closes the connection. Built by `bounded_protocol`."""

    max_header_bytes = 16 * 1024
    read_timeout_s = 10.0
    linger_s = 1.0  # after a refusal: time for the client to read it before the socket closes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._reading_headers = True
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(self.read_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already; the rest of what it sends is dropped
        super().data_received(data)
        if self._reading_headers and not self.transport.is_closing():
            self._header_bytes += len(data)  # the chunk that completes the headers is not counted
            if self._header_bytes > self.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request's headers are over {self.max_header_bytes} bytes (GENREC_MAX_HEADER_BYTES)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._reading_headers:  # the next request on a kept-alive connection
            self._reading_headers = True
            self._header_bytes = 0
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.read_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._reading_headers and not self.transport.is_closing():
            if self._header_bytes == 0 and self.cycle is None:
                self.transport.close()  # a connection that never sent a byte: nothing to answer
                return
            self._refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.read_timeout_s:g} s "
                                                 "(GENREC_REQUEST_READ_TIMEOUT_S)")

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer, then close gently: closing at once with unread input makes the kernel send a reset,
        which can destroy the answer before the client reads it. So: half-close (FIN), stop reading,
        and close after linger_s."""
        self._cancel_header_timer()
        self._refused = True
        self.transport.write(_raw_response(status, reason, detail))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.pause_reading()
        self.loop.call_later(self.linger_s, self.transport.close)


def bounded_protocol(max_header_bytes: int, read_timeout_s: float) -> type[BoundedHttpToolsProtocol]:
    """A protocol class with these limits, for uvicorn's `http=` option."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "read_timeout_s": read_timeout_s})
