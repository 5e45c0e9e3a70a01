"""DICOM TLS and HTTPS with real peers: a `medfinder serve` node with --tls-cert/--tls-key/--tls-ca and api.https,
dcmtk echoscu/storescu/storescp with their TLS options, pynetdicom and httpx clients, openssl-made certificates.

The PKI is made here with the `openssl` CLI: a test CA, a rogue CA, the node's certificate, a peer certificate
(a good client, and the PACS's server certificate) and a stranger's certificate signed by the rogue CA. Every
listener binds 127.0.0.1 on a free port; the node and storescp processes are stopped when their context ends.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from node_helpers import (
    VENV_BIN,
    dataset_bytes,
    free_port,
    nodelay_env,
    require_tools,
    stop_process,
    storescp,
    storescu,
    wait_for,
    write_node_config,
)
from pynetdicom import AE
from sr_helpers import write_sr

from config import load_settings
from config.settings import TlsSettings
from dicom_node.deliver.delivery import DeliveryWorker
from dicom_node.store.state import DeliveryState, StateStore
from dicom_node.tls import client_context

REPO = Path(__file__).resolve().parent.parent
VERIFICATION = "1.2.840.10008.1.1"

LEAF_EXTENSIONS = """basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=IP:127.0.0.1,DNS:localhost
"""


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files: ``<name>.pem`` / ``<name>.key`` for ca, rogue (CAs), node, peer (signed by ca), stranger (rogue)."""
    require_tools("openssl")
    folder = tmp_path_factory.mktemp("pki")
    (folder / "leaf.ext").write_text(LEAF_EXTENSIONS, encoding="utf-8")
    for ca in ("ca", "rogue"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{ca}.key"),
                 "-out", str(folder / f"{ca}.pem"), "-days", "2", "-subj", f"/CN=MedFinder test {ca} CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, issuer in (("node", "ca"), ("peer", "ca"), ("stranger", "rogue")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{name}.key"),
                 "-out", str(folder / f"{name}.csr"), "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / f"{issuer}.pem"),
                 "-CAkey", str(folder / f"{issuer}.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(folder / f"{name}.pem"), "-extfile", str(folder / "leaf.ext"))
    return {path.stem if path.suffix == ".pem" else f"{path.stem}.key": path
            for path in folder.iterdir() if path.suffix in (".pem", ".key")}


def _tls_echo(port: int, pki: dict[str, Path], who: str = "peer") -> subprocess.CompletedProcess:
    """dcmtk echoscu over TLS presenting ``who``'s certificate, verifying the node against the test CA."""
    return subprocess.run(["echoscu", "+tls", str(pki[f"{who}.key"]), str(pki[who]), "+cf", str(pki["ca"]),
                           "-to", "10", "-aet", "TLSSCU", "-aec", "MEDFINDER", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, env=nodelay_env(), check=False)


class TlsNode:
    def __init__(self, port: int, http_port: int, log: Path, data_dir: Path) -> None:
        self.port, self.http_port, self.log, self.data_dir = port, http_port, log, data_dir

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def node(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """`medfinder serve` with DICOM TLS (mutual: --tls-ca) and HTTPS on a free port each; no model bundle."""
    require_tools("echoscu", "storescu")
    folder = tmp_path_factory.mktemp("tls-node")
    config = write_node_config(folder / "node.yaml", folder / "data", None)
    port, http_port, log = free_port(), free_port(), folder / "node.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(VENV_BIN / "medfinder"), "serve", "--config", str(config), "--port", str(port),
                                    "--tls-cert", str(pki["node"]), "--tls-key", str(pki["node.key"]),
                                    "--tls-ca", str(pki["ca"]), "--http-port", str(http_port),
                                    "--set", "api.https=true"],
                                   cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or _tls_echo(port, pki).returncode == 0, 60,
                 "the node to answer a TLS C-ECHO", interval=0.3)
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        yield TlsNode(port, http_port, log, folder / "data")
    finally:
        stop_process(process)


def test_good_client_echoes_and_stores_over_tls(node: TlsNode, pki: dict[str, Path], lung_ct_dir: Path) -> None:
    """dcmtk (BCP 195 profile) and pynetdicom clients with a certificate our CA signed get C-ECHO and C-STORE."""
    assert _tls_echo(node.port, pki).returncode == 0

    ct_file = min(lung_ct_dir.rglob("*.dcm"))
    sent = storescu(node.port, [ct_file], calling_ae="TLSSCU",
                    extra=["+tls", str(pki["peer.key"]), str(pki["peer"]), "+cf", str(pki["ca"])])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    sop_uid = str(pydicom.dcmread(ct_file, stop_before_pixels=True).SOPInstanceUID)
    assert wait_for(lambda: [p for p in node.data_dir.rglob("*") if p.is_file() and sop_uid in p.name], 10,
                    "the stored instance in the spool")

    ae = AE(ae_title="PYTLS")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    context = client_context(TlsSettings(cert_file=str(pki["peer"]), key_file=str(pki["peer.key"]),
                                         ca_file=str(pki["ca"])))
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MEDFINDER", tls_args=(context, "127.0.0.1"))
    assert assoc.is_established
    try:
        version = assoc.dul.socket.socket.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def _tls11_handshake(port: int, pki: dict[str, Path]) -> str:
    """A TLS 1.1 ClientHello (the client's OpenSSL allows it at security level 0); returns the failure text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.load_cert_chain(pki["peer"], pki["peer.key"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
            return f"handshake succeeded with {tls.version()}"
    except ssl.SSLError as error:
        return str(error)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_clients_without_a_trusted_certificate_or_tls_12_are_refused(node: TlsNode, pki: dict[str, Path]) -> None:
    """An unknown CA, no client certificate, plain TCP and TLS 1.1 fail the handshake before any DICOM is read;
    each is logged with its reason, and the node keeps serving good clients."""
    before = node.log_text().count("event=tls_handshake_failed")
    stranger = _tls_echo(node.port, pki, who="stranger")
    anonymous = subprocess.run(["echoscu", "+tla", "+cf", str(pki["ca"]), "-to", "10", "-aec", "MEDFINDER",
                                "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=30,
                               env=nodelay_env(), check=False)
    plain = subprocess.run(["echoscu", "-to", "10", "-aec", "MEDFINDER", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, timeout=30, env=nodelay_env(), check=False)
    tls11 = _tls11_handshake(node.port, pki)

    assert stranger.returncode != 0 and anonymous.returncode != 0 and plain.returncode != 0
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in tls11, tls11  # the node's alert, not a client-side refusal
    reasons = wait_for(lambda: (lines := [line for line in node.log_text().splitlines()
                                          if "event=tls_handshake_failed" in line][before:]) and len(lines) >= 4
                       and lines, 10, "four handshake failures in the node log")
    text = "\n".join(reasons)
    for reason in ("CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "WRONG_VERSION_NUMBER",
                   "UNSUPPORTED_PROTOCOL"):
        assert reason in text, text
    assert _tls_echo(node.port, pki).returncode == 0


def _tls12_handshake(port: int, pki: dict[str, Path], ciphers: str) -> str:
    """A TLS 1.2 handshake offering only ``ciphers``: the negotiated suite, or the failure text."""
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(pki["peer"], pki["peer.key"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return f"{tls.version()} {(tls.cipher() or ('?',))[0]}"
    except ssl.SSLError as error:
        return str(error)


def test_tls12_takes_bcp195_suites_only(node: TlsNode, pki: dict[str, Path]) -> None:
    """TLS 1.2 with an AEAD, forward-secret suite is accepted; a CBC-only client gets a handshake failure."""
    assert _tls12_handshake(node.port, pki, "ECDHE-RSA-AES128-GCM-SHA256") == "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"
    refused = _tls12_handshake(node.port, pki, "ECDHE-RSA-AES128-SHA256:AES128-SHA")
    assert "HANDSHAKE_FAILURE" in refused, refused


def test_a_silent_connection_does_not_hold_up_other_associations(node: TlsNode, pki: dict[str, Path]) -> None:
    """pynetdicom would handshake in its accepting thread: one idle TCP peer would block every other client."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10):
        started = time.monotonic()
        assert _tls_echo(node.port, pki).returncode == 0
        assert time.monotonic() - started < 5


def test_https_healthz_with_the_ca_and_a_client_certificate(node: TlsNode, pki: dict[str, Path]) -> None:
    """The REST API speaks HTTPS with the node's certificate; with --tls-ca it wants a client certificate too."""
    url = f"https://127.0.0.1:{node.http_port}/api/v1/healthz"
    trusted = ssl.create_default_context(cafile=str(pki["ca"]))
    trusted.load_cert_chain(pki["peer"], pki["peer.key"])
    response = httpx.get(url, verify=trusted, timeout=10)
    assert response.status_code == 200, response.text

    no_client_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=no_client_cert, timeout=10).raise_for_status()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{node.http_port}/api/v1/healthz", timeout=10)


def test_delivery_to_tls_destinations(pki: dict[str, Path], tmp_path: Path) -> None:
    """SRs reach a dcmtk storescp over TLS (it requires our client certificate); a PACS whose certificate our CA
    did not sign and a plain association to the TLS port are failed attempts."""
    sr_file, _ = write_sr(tmp_path / "results")
    sr = pydicom.dcmread(sr_file, stop_before_pixels=True)
    good_port, rogue_port, inbox = free_port(), free_port(), tmp_path / "pacs"
    destinations = [{"ae_title": "PACS", "host": "127.0.0.1", "port": good_port, "tls": True},
                    {"ae_title": "PLAIN", "host": "127.0.0.1", "port": good_port, "tls": False},
                    {"ae_title": "ROGUE", "host": "127.0.0.1", "port": rogue_port, "tls": True}]
    settings = load_settings(None, environ={}, overrides={
        "paths": {"data_dir": str(tmp_path / "data")},
        "node": {"ae_title": "MEDFINDER", "delivery_attempts": 1, "delivery_timeout_s": 5.0,
                 "destinations": destinations,
                 "tls": {"cert_file": str(pki["node"]), "key_file": str(pki["node.key"]), "ca_file": str(pki["ca"])}},
    })
    store = StateStore(tmp_path / "state.sqlite3")
    try:
        for d in destinations:
            store.add_delivery(sr.StudyInstanceUID, 1, sr.SOPInstanceUID, sr_file, f"{d['ae_title']}@127.0.0.1",
                               str(d["ae_title"]), "127.0.0.1", int(d["port"]))
        # storescp's AE title check is off: PLAIN and PACS reach the same TLS listener
        with storescp(inbox, port=good_port, options=["+tls", str(pki["peer.key"]), str(pki["peer"]),
                                                      "+cf", str(pki["ca"])]), \
                storescp(tmp_path / "rogue", port=rogue_port, options=["+tls", str(pki["stranger.key"]),
                                                                      str(pki["stranger"]), "+cf", str(pki["ca"])]):
            assert DeliveryWorker(settings, store).run_once() == 3
        rows = {row.ae_title: row for row in store.deliveries()}
    finally:
        store.close()

    assert (rows["PACS"].state, rows["PACS"].last_status) == (DeliveryState.DELIVERED, "0x0000")
    (received,) = [p for p in inbox.iterdir() if p.is_file()]
    assert dataset_bytes(received) == dataset_bytes(sr_file)
    assert (rows["PLAIN"].state, rows["PLAIN"].last_status) == (DeliveryState.DEAD, "no-association")
    assert (rows["ROGUE"].state, rows["ROGUE"].last_status) == (DeliveryState.DEAD, "no-association")
    assert not [p for p in (tmp_path / "rogue").iterdir() if p.is_file()]


def test_serve_refuses_https_without_a_certificate(tmp_path: Path) -> None:
    """api.https with no node.tls: a clear message before anything listens."""
    config = write_node_config(tmp_path / "node.yaml", tmp_path / "data", None)
    result = subprocess.run([str(VENV_BIN / "medfinder"), "serve", "--config", str(config), "--port", str(free_port()),
                             "--http-port", str(free_port()), "--set", "api.https=true"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 2 and "api.https needs node.tls" in result.stderr, result.stderr
