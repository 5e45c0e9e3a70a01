"""DICOM TLS and HTTPS with real peers: a `medfinder serve` node with --tls-cert/--tls-key/--tls-ca and api.https,
dcmtk echoscu/storescu/storescp with their TLS options, pynetdicom and httpx clients, openssl-made certificates.

The PKI is made here with the `openssl` CLI: a test CA, a rogue CA, the node's certificate, a peer certificate
(a good client, and the PACS's server certificate) and a stranger's certificate signed by the rogue CA. Every
listener binds 127.0.0.1 on a free port; the node and storescp processes are stopped when their context ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
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


@contextlib.contextmanager
def _tls_serve(config: Path, data_dir: Path, pki: dict[str, Path], *args: str) -> Iterator[TlsNode]:
    """`medfinder serve --config CONFIG` (whose data folder is ``data_dir``) with DICOM TLS (mutual: --tls-ca) on
    a free port, logging beside CONFIG; stopped when the context ends."""
    require_tools("echoscu", "storescu")
    port, log = free_port(), config.parent / "node.log"
    http_port = int(args[args.index("--http-port") + 1]) if "--http-port" in args else 0
    with open(log, "wb") as out:
        process = subprocess.Popen([str(VENV_BIN / "medfinder"), "serve", "--config", str(config), "--port", str(port),
                                    "--tls-cert", str(pki["node"]), "--tls-key", str(pki["node.key"]),
                                    "--tls-ca", str(pki["ca"]), *args],
                                   cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or _tls_echo(port, pki).returncode == 0, 60,
                 "the node to answer a TLS C-ECHO", interval=0.3)
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        yield TlsNode(port, http_port, log, data_dir)
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def node(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """`medfinder serve` with DICOM TLS (mutual: --tls-ca) and HTTPS on a free port each; no model bundle."""
    folder = tmp_path_factory.mktemp("tls-node")
    config = write_node_config(folder / "node.yaml", folder / "data", None)
    with _tls_serve(config, folder / "data", pki, "--http-port", str(free_port()), "--set", "api.https=true") as served:
        yield served


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


def _node_rows(data_dir: Path, sql: str) -> list[dict]:
    """Rows of the node's state store, read beside the running node (nothing when it has none yet)."""
    if not (data_dir / "state.sqlite3").is_file():
        return []
    with contextlib.closing(sqlite3.connect(data_dir / "state.sqlite3")) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(sql)]


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def test_results_go_back_over_tls_to_an_allow_list_source(pki: dict[str, Path], tmp_path: Path, lung_ct_dir: Path,
                                                          tiny_bundle: Path) -> None:
    """No destinations: a study's SR and PDF go back to the allow-list entry of the AE that sent it. TLSSCU's entry
    says tls: true, so they reach the dcmtk storescp over TLS (it checks our client certificate, we check its
    certificate as 127.0.0.1); PLAINSCU's entry names the same TLS port with tls: false: plain TCP, not delivered."""
    from model_export.registry import install_bundle

    data_dir = tmp_path / "data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    sr_port, inbox = free_port(), tmp_path / "sender"
    allow = [{"ae_title": "TLSSCU", "host": "127.0.0.1", "port": sr_port, "tls": True},
             {"ae_title": "PLAINSCU", "host": "127.0.0.1", "port": sr_port, "tls": False}]
    config = write_node_config(tmp_path / "node.yaml", data_dir, None, node={"allow": allow, "delivery_attempts": 1})
    tls_study = sorted((lung_ct_dir / "Lung_Dx-A0002_series2_B70f").glob("*.dcm"))
    plain_study = sorted((lung_ct_dir / "Lung_Dx-A0001_series2_5mm").glob("*.dcm"))
    peer_tls = ["+tls", str(pki["peer.key"]), str(pki["peer"]), "+cf", str(pki["ca"])]
    with storescp(inbox, port=sr_port, options=peer_tls), _tls_serve(config, data_dir, pki) as served:
        for calling_ae, files in (("TLSSCU", tls_study), ("PLAINSCU", plain_study)):
            sent = storescu(served.port, files, calling_ae=calling_ae, extra=peer_tls)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        query = "SELECT study_uid, ae_title, host, port, state, last_status FROM deliveries"
        rows = wait_for(lambda: (found := _node_rows(data_dir, query)) and len(found) == 4
                        and all(r["state"] != DeliveryState.PENDING for r in found) and found, 120,
                        f"an SR and a PDF per study delivered or dead\n{served.log_text()[-3000:]}", interval=0.5)

    by_ae = {ae: [r for r in rows if r["ae_title"] == ae] for ae in ("TLSSCU", "PLAINSCU")}
    assert {(r["study_uid"], r["state"], r["last_status"]) for r in by_ae["TLSSCU"]} == {
        (_study_uid(tls_study), DeliveryState.DELIVERED, "0x0000")}, rows
    assert {(r["study_uid"], r["state"], r["last_status"]) for r in by_ae["PLAINSCU"]} == {
        (_study_uid(plain_study), DeliveryState.DEAD, "no-association")}, rows
    received = [pydicom.dcmread(p, stop_before_pixels=True) for p in inbox.iterdir() if p.is_file()]
    assert len(received) == 2 and {str(ds.StudyInstanceUID) for ds in received} == {_study_uid(tls_study)}
    assert "1.2.840.10008.5.1.4.1.1.88.34" in {str(ds.SOPClassUID) for ds in received}, "the Comprehensive 3D SR"


def test_an_allow_list_source_without_a_host_is_matched_by_title_and_port(pki: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """The entry names no host: the result goes to the sender's IP, and its rows there use TLS; a row to another
    port of that AE, or to a configured plain destination at the same address, does not."""
    from types import SimpleNamespace

    from dicom_node.report.reporting import destinations_for

    settings = load_settings(None, environ={}, overrides={"node": {
        "allow": [{"ae_title": "MODALITY", "port": 4242, "tls": True}],
        "tls": {"cert_file": str(pki["node"]), "key_file": str(pki["node.key"]), "ca_file": str(pki["ca"])}}})
    study = SimpleNamespace(calling_ae="MODALITY", peer_ip="10.1.2.3")
    (destination,) = destinations_for(settings, study)  # type: ignore[arg-type]
    assert (destination.host, destination.port, destination.tls) == ("10.1.2.3", 4242, True)

    with_plain_destination = settings.model_copy(deep=True)
    with_plain_destination.node.destinations = [destination.model_copy(update={"tls": False})]
    store = StateStore(tmp_path / "state.sqlite3")
    try:
        for ae_title, port in (("MODALITY", 4242), ("MODALITY", 4243)):
            store.add_delivery("1.2.3", 1, f"1.2.3.{port}", tmp_path / "sr.dcm", f"{ae_title}:{port}", ae_title,
                               "10.1.2.3", port)
        rows = {row.port: row for row in store.deliveries()}
        worker = DeliveryWorker(settings, store)
        assert worker._tls_for(rows[4242]) is not None and worker._tls_for(rows[4243]) is None
        assert DeliveryWorker(with_plain_destination, store)._tls_for(rows[4242]) is None
    finally:
        store.close()


def _orthanc_tls_pacs(folder: Path, pki: dict[str, Path], http_port: int, dicom_port: int) -> Path:
    """An Orthanc configuration: AE PACS speaking DICOM TLS only (the peer certificate, client certificates
    signed by the test CA required), C-FIND and C-GET for any calling AE."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"Name": "tls-pacs", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "PACS", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "Plugins": [], "DicomAlwaysAllowFind": True,
              "DicomAlwaysAllowGet": True, "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki["peer"]),
              "DicomTlsPrivateKey": str(pki["peer.key"]), "DicomTlsTrustedCertificates": str(pki["ca"]),
              "DicomTlsRemoteCertificateRequired": True}
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _backfill(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "medfinder"), "backfill", "--config", str(config), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          check=False)


def test_backfill_over_tls_from_a_tls_pacs_into_the_tls_node(node: TlsNode, pki: dict[str, Path], tmp_path: Path,
                                                             shared_data: Path) -> None:
    """dcmqrscp has no TLS options (dcmtk 3.6.7), so Debian Orthanc with DICOM TLS is the PACS. `--tls --method
    get`: C-FIND and C-GET over TLS (our node certificate presented, Orthanc's checked as 127.0.0.1), each object
    C-STOREd on to the TLS node over TLS; every instance arrives. Without --tls the association fails with a clear
    message; --tls with no node.tls certificate and CA is refused before any association."""
    from orthanc_helpers import orthanc_server

    head = tmp_path / "head"
    head.mkdir()
    for path in sorted((shared_data / "ct" / "dcm_qa_ct-ge-head").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyDate = "20240103"  # the fixture has none; the backfill asks day by day
        ds.save_as(head / path.name, enforce_file_format=True)
    files = sorted(head.glob("*.dcm"))
    study_uid = _study_uid(files)
    tls = {"cert_file": str(pki["node"]), "key_file": str(pki["node.key"]), "ca_file": str(pki["ca"])}
    with_tls = write_node_config(tmp_path / "backfill.yaml", node.data_dir, None, node={"port": node.port, "tls": tls})
    without_tls = write_node_config(tmp_path / "no-tls.yaml", node.data_dir, None, node={"port": node.port})
    days = ("--since", "20240101", "--until", "20240105", "--method", "get")
    http_port, dicom_port = free_port(), free_port()
    with orthanc_server(_orthanc_tls_pacs(tmp_path / "orthanc", pki, http_port, dicom_port), http_port,
                        tmp_path / "orthanc.log"):
        for path in files:
            assert httpx.post(f"http://127.0.0.1:{http_port}/instances", content=path.read_bytes(),
                              timeout=60).status_code == 200
        source = ("--from", f"PACS@127.0.0.1:{dicom_port}")

        refused = _backfill(without_tls, *source, "--tls", *days)
        assert refused.returncode == 2 and "set node.tls.ca_file" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr
        plain = _backfill(with_tls, *source, *days)
        assert plain.returncode == 2 and "refused or did not answer" in plain.stderr, plain.stderr
        assert _node_rows(node.data_dir, f"SELECT * FROM studies WHERE study_uid = '{study_uid}'") == []

        result = _backfill(with_tls, *source, "--tls", *days)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 asked for, 1 complete" in result.stdout, result.stdout
    (study,) = _node_rows(node.data_dir, f"SELECT n_instances FROM studies WHERE study_uid = '{study_uid}'")
    assert study["n_instances"] == len(files)
