"""TLS contexts from ``node.tls`` for the DICOM SCP, the delivery SCU and the REST API (PS3.15 BCP 195 profile).

Python's default contexts give TLS 1.2+ without compression or renegotiation; their TLS 1.2 list still has CBC and
SHA-1-MAC suites, so it is cut to the AEAD suites with forward secrecy that BCP 195 (RFC 9325 4.2) recommends and
DICOM's Non-Downgrading BCP 195 profile (PS3.15 B.10, dcmtk's default ``+py``) proposes. TLS 1.3 suites are all
AEAD and stay as they are. The minimum version (1.2 or 1.3) comes from the settings. One place builds the contexts
so the SCP, the delivery SCU and the REST API cannot drift apart.
"""

from __future__ import annotations

import ssl

from config.settings import TlsSettings

MINIMUM_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+aRSA+AESGCM"


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """What our listeners present: our certificate; with ``ca_file`` a client certificate signed by that CA is
    required (mutual TLS), without it clients stay anonymous. Raises OSError/ssl.SSLError for unreadable files."""
    if not tls.cert_file or not tls.key_file:
        raise ValueError("TLS needs node.tls.cert_file and node.tls.key_file")
    # cafile given: only that CA is trusted for client certificates (no system CAs)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls.ca_file)
    context.minimum_version = MINIMUM_VERSIONS[tls.min_version]
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca_file else ssl.CERT_NONE
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """What our SCU uses towards a TLS peer: the peer's certificate is verified against ``ca_file`` (the system
    CAs without it) including its host name or IP; ours is presented when configured (peers that want mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = MINIMUM_VERSIONS[tls.min_version]
    context.set_ciphers(TLS12_CIPHERS)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
