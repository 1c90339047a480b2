"""Running the app under uvicorn with a drain a load balancer can see, and bounded connections.

Signals:
- SIGTERM / SIGINT: /health/ready turns 503 at once ("draining") while every route keeps serving
  for `drain_seconds`, so a load balancer polling readiness takes the instance out before its port
  closes. Then uvicorn stops accepting, answers what is in flight (queued micro-batches included),
  and the app's shutdown flushes the event spool and exits. A second SIGTERM/SIGINT ends the wait.
- SIGHUP: ignored with a log line (its default action would kill the process mid-flight).

Connections: keep-alive idle timeout, a cap on open connections (uvicorn answers 503 beyond it),
and the header size and read time limits of service/clients.py.

Startup: a failure the operator fixes by configuration (a bundle that is missing, unreadable or
corrupt; a corrupt event spool) is logged as one line saying what to fix, not a traceback.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.clients import bounded_protocol
from service.config import Settings
from service.deps import AppState

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first stop signal starts the drain period instead of stopping."""

    def __init__(self, config: uvicorn.Config, state: AppState, drain_seconds: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_seconds = drain_seconds
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_timer is not None or self.drain_seconds <= 0:  # second signal, or no drain period
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            super().handle_exit(sig, frame)
            return
        self.state.start_draining()
        log.info("%s: readiness is 503; serving %.1f s more before closing the port",
                 signal.Signals(sig).name, self.drain_seconds)
        self._drain_timer = threading.Timer(self.drain_seconds, super().handle_exit, args=(sig, frame))
        self._drain_timer.daemon = True
        self._drain_timer.start()


# The exceptions whose message says what to fix (the last line of a startup traceback starts so).
_CONFIGURATION_ERRORS = ("service.bundle.BundleError", "service.spool.SpoolCorrupt", "FileNotFoundError",
                         "PermissionError")


class OneLineStartupErrors:
    """Shortens a configuration error at startup to its last line ("BundleError: <what to fix>");
    any other startup failure keeps its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                lines = str(message.get("message", "")).strip().splitlines()
                if lines and lines[-1].startswith(_CONFIGURATION_ERRORS):
                    message = {**message, "message": f"cannot start: {lines[-1]}"}
            await send(message)

        await self.app(scope, receive, send_short)


def _ignore_sighup(sig: int, frame: FrameType | None) -> None:
    log.info("SIGHUP ignored: send SIGTERM to drain and stop")


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    config = uvicorn.Config(
        OneLineStartupErrors(app),
        host=settings.host,
        port=settings.port,
        access_log=settings.access_log,
        http=bounded_protocol(settings.max_header_bytes, settings.request_read_timeout_s),
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout_s)),
        limit_concurrency=settings.max_connections,
        # In-flight requests get the batcher's drain time and some slack before uvicorn cancels them.
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    return DrainingServer(config, app.state.genrec, settings.drain_seconds)


def serve(app: FastAPI, settings: Settings) -> None:
    server = build_server(app, settings)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _ignore_sighup)
    server.run()
