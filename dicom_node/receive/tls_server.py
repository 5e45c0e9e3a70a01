"""The SCP's association server over TLS, with each TLS handshake in its connection's own thread.

pynetdicom 3.0.4 wraps accepted sockets with ``do_handshake_on_connect`` in ``get_request``, i.e. in the one
accepting thread and with no timeout: a peer that opens a TCP connection and sends nothing (a port scanner, a
plain-TCP client waiting for us) would stop every other association from being accepted. Here the accepting
thread only wraps the socket; the handshake runs in the connection's thread with a deadline, and a failed one
(plain DICOM on the TLS port, an unknown CA, TLS < 1.2) is logged and the connection closed before any DICOM
is read.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)


class TlsAssociationServer(ThreadedAssociationServer):
    """A threaded association server whose clients must complete a TLS handshake within ``handshake_timeout_s``."""

    handshake_timeout_s: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        listener = cast(socket.socket, self.socket)
        client, address = listener.accept()
        if self.ssl_context is None:
            return client, address
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshake (in the connection's thread), then hand the connection to pynetdicom's request handler."""
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ValueError) as error:  # ssl.SSLError and socket.timeout are OSErrors
                reason = getattr(error, "reason", None) or type(error).__name__
                logger.warning("event=tls_handshake_failed peer_ip=%s reason=%s", client_address[0], reason)
                self.shutdown_request(request)
                return
            logger.debug("event=tls_established peer_ip=%s version=%s cipher=%s", client_address[0],
                         request.version(), (request.cipher() or ("?",))[0])
        super().finish_request(request, client_address)
