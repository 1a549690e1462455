"""A thin uvicorn runner for the app (clipsql.serve.app.create_app) on its own thread."""
from __future__ import annotations

import threading
import time
from typing import Any

from clipsql.errors import ServeError
from clipsql.lazy import uvicorn
from clipsql.serve.app import create_app
from clipsql.serve.auth import Auth


class HttpServer:
    def __init__(self, server: Any, thread: threading.Thread):
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        for s in getattr(self._server, "servers", []) or []:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self._server.config.port

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def start(store: Any, *, host: str, port: int, auth: Auth, tls: tuple[str, str] | None = None,
          remote_images: bool = False, timeout_s: float = 30.0) -> HttpServer:
    """Serve the app on host:port (HTTPS with tls = (cert file, key file)); returns once listening.
    `remote_images`: tiles of http(s) uris load from their own hosts in the curator's browser."""
    app = create_app(store, auth=auth, remote_images=remote_images)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
    server = uvicorn.Server(config)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            server.run()          # off the main thread uvicorn installs no signal handlers
        except BaseException as e:  # noqa: BLE001 - uvicorn exits (SystemExit) when it cannot bind
            failed.append(e)

    thread = threading.Thread(target=run, name="clipsql-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ServeError(f"cannot serve the app on {host}:{port} (is the port in use?)")
        time.sleep(0.02)
    return HttpServer(server, thread)
