"""uvicorn in a thread of the node process: started after the DICOM SCP, stopped before the index closes.

The socket is bound here, before uvicorn runs, so a port in use fails ``start()`` with a clear OSError (uvicorn
itself would ``sys.exit`` inside its thread). uvicorn's access log is off: URLs carry study UIDs, and the audit
trail is where requests are recorded. With ``api.https`` the same socket speaks TLS with the context
:func:`dicom_node.tls.server_context` builds from ``node.tls`` (uvicorn's own defaults allow weaker ciphers).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class ApiServer:
    """One uvicorn server for ``app`` on ``host:port`` (port 0 = any free port, for tests), HTTPS with ``tls``."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self._socket = _bind(host, port)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                server_header=False,
                                ssl_context_factory=(lambda _config, _default: tls) if tls is not None else None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-api", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise RuntimeError(f"the HTTP API did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        logger.info("event=http_ready bind=%s port=%d https=%s docs=%s/docs", self.host, self.port,
                    self.tls is not None, self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()
        logger.info("event=http_stopped")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on for accepted connections only when the listening
    # socket says TCP, and without it Nagle + delayed ACK add ~40 ms to every response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"the REST API cannot listen on {host}:{port}: {error.strerror}") from error
    sock.set_inheritable(True)
    return sock
