"""Malformed queries to a real ``medfinder serve`` with a model bundle: REST bodies, paths and parameters over real
HTTP (httpx) and C-FIND identifiers (pynetdicom SCU, garbage values put on the wire as raw bytes). Every one must
be answered with 4xx / a C-FIND failure or success status: never 5xx, never an abort."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from node_helpers import VENV_BIN, free_port, start_node, stop_process, wait_for, write_node_config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND

from model_export.registry import install_bundle

BAD_UID = "1.2.abc"


def _token(data_dir: Path) -> str:
    result = subprocess.run([str(VENV_BIN / "medfinder"), "token", "create", "--name", "fuzz", "--scope", "read",
                             "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1]


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> Dataset:
    """Put ``value`` on the wire as is (pydicom writes a raw element's bytes without checking them)."""
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return ds


def _identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _identifiers() -> list[Dataset]:
    """Identifiers the SCP must answer. Not among them: an empty identifier, which pynetdicom's SCU announces but
    never sends (the SCP then waits for it until its DIMSE timeout, as it should)."""
    cases = [
        _raw(Dataset(), 0x00100010, "PN", b"x"),  # no QueryRetrieveLevel at all (an empty identifier: see below)
        _identifier(StudyInstanceUID=""),
        _identifier(StudyInstanceUID=BAD_UID),
        _identifier(StudyInstanceUID="\\".join(f"1.2.{i}" for i in range(3000))),
        _identifier(StudyDate="2024-01-01"),
        _identifier(StudyDate="20241301-20240101"),
        _identifier(StudyDate="-"),
        _identifier(StudyTime="25:61"),
        _identifier(StudyDescription="*" * 64),
        _identifier(StudyDescription="?\\*\\"),
        _identifier(ModalitiesInStudy="CT\\MR\\" + "X" * 16),
        _identifier(PatientID="*"),
        _identifier(AccessionNumber="\x00\x01\x02"),
    ]
    odd_level = _identifier(StudyInstanceUID="")
    odd_level.QueryRetrieveLevel = "IMAGE"
    cases.append(odd_level)
    for tag, vr, value in [(0x00080020, "DA", b"\xff\xfe\x00garbage"), (0x0020000D, "UI", b"\xff" * 63 + b"\x00"),
                           (0x00081030, "LO", b"\xc3\x28" * 20), (0x00080052, "CS", b"\x00" * 15 + b" "),
                           (0x00200010, "SH", b"x" * 2000), (0x00990010, "LO", b"MEDFINDER "),
                           (0x00991001, "UN", b"\x01"), (0x00991002, "UN", b"\x00" * 3),
                           (0x00080061, "CS", b"\\\\\\\\"), (0x00100010, "PN", b"=" * 70)]:
        cases.append(_raw(_identifier(StudyInstanceUID=""), tag, vr, value))
    return cases


def _find_all(port: int, called: str, identifiers: list[Dataset]) -> list[int | None]:
    """The final status of each C-FIND (None: no final answer), all on one association (a new one if aborted)."""
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 20
    ae.add_requested_context(STUDY_ROOT_FIND, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    finals: list[int | None] = []
    assoc = None
    try:
        for ds in identifiers:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title=called)
                assert assoc.is_established
            final = None
            for status, _identifier in assoc.send_c_find(ds, STUDY_ROOT_FIND):
                if "Status" in status and status.Status not in (0xFF00, 0xFF01):
                    final = int(status.Status)
            finals.append(final)
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
    return finals


def _rest_cases(uid: str) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(method, path, httpx keywords, certainly malformed: must be 4xx)."""
    cases: list[tuple[str, str, dict[str, Any], bool]] = []
    for params in [{"limit": "abc"}, {"limit": "-1"}, {"limit": str(10**30)}, {"offset": "-5"}, {"state": "bogus"},
                   {"limit": "1e3"}, {"since": "yesterday"}]:
        cases.append(("GET", "/studies", {"params": params}, False))
    for bad in [BAD_UID, "1." * 40 + "1", "9" * 5000, "..%2F..%2Fetc", "%00", "\u00fc\u00df", "1.2.3.4"]:
        cases += [("GET", f"/studies/{bad}", {}, True), ("GET", f"/studies/{bad}/similar", {}, True),
                  ("GET", f"/studies/{bad}/thumbnail", {}, True)]
    for params in [{"limit": "abc"}, {"limit": "-1"}, {"limit": "100000"}, {"min_score": "abc"},
                   {"min_score": "5"}, {"min_score": "nan"}, {"modality": "\x00" * 10}, {"exclude_same_patient": "x"}]:
        cases.append(("GET", f"/studies/{uid}/similar", {"params": params}, False))
    for body in [b"not json", b"[1, 2", b"\xff\xfe\x00", b"[]", b"{}", b'{"text": 123}', b'{"text": null}',
                 b'{"text": ""}', b'{"text": "nodule", "limit": -1}', b'{"text": "nodule", "limit": "x"}',
                 b'{"text": "nodule", "min_score": 1e309}', b'{"study_instance_uid": "1.2.abc"}',
                 b'{"text": {"nested": ' * 200 + b"1" + b"}}" * 200, b'{"text": "' + b"x" * 200_000 + b'"}',
                 b'{"text": "nodule", "filters": "CT"}', b'{"text": "nodule", "unknown_field": [1, 2, 3]}']:
        cases.append(("POST", "/search", {"content": body, "headers": {"Content-Type": "application/json"}},
                      body not in (b'{"text": "' + b"x" * 200_000 + b'"}',)))
    cases.append(("POST", "/search", {"content": b"text=nodule",
                                      "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, True))
    for body in [b"", b"garbage", b'{"text": 5}', b'{"report": "x"}']:
        cases.append(("PUT", f"/studies/{uid}/report", {"content": body}, True))  # also: a read token may not
    cases += [("GET", "/no/such/route", {}, True), ("DELETE", "/studies", {}, True), ("PATCH", "/search", {}, True)]
    return cases


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_malformed_rest_and_c_find_never_fail_the_node(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir = tmp_path / "node-data"
    install_bundle(tiny_bundle, data_dir, activate=True)
    reader = _token(data_dir)
    config = write_node_config(tmp_path / "node.yaml", data_dir, None)
    port, http_port = free_port(), free_port()
    node = start_node(config, port, tmp_path / "node.log", "--http-port", str(http_port))
    base = f"http://127.0.0.1:{http_port}/api/v1"
    codes: Counter[int] = Counter()
    try:
        wait_for(lambda: _ok(f"{base}/healthz"), 60, "the REST API")
        with httpx.Client(base_url=base, timeout=30) as client:
            for auth in ["Bearer", "Bearer \u00fc\u00e4".encode(), "Basic Zm9vOmJhcg==", "Bearer " + "x" * 10_000]:
                answer = client.get("/studies", headers={"Authorization": auth})
                assert 400 <= answer.status_code < 500, (auth[:20], answer.status_code, answer.text[:300])
                codes[answer.status_code] += 1
            headers = {"Authorization": f"Bearer {reader}"}
            for method, path, keywords, malformed in _rest_cases("1.2.826.0.1.3680043.10.1015.1"):
                extra = keywords.pop("headers", {})
                answer = client.request(method, path, headers={**headers, **extra}, **keywords)
                codes[answer.status_code] += 1
                assert answer.status_code < 500, (method, path[:80], keywords, answer.status_code, answer.text[:300])
                if malformed:
                    assert answer.status_code >= 400, (method, path[:80], answer.status_code, answer.text[:300])
        finals = {called: _find_all(port, called, _identifiers()) for called in ("MEDFINDER", "MEDFINDER_SIM")}
        print(f"\nREST answers by code: {dict(sorted(codes.items()))}")
        for called, statuses in finals.items():
            print(f"C-FIND {called}: " + ", ".join(f"0x{s:04X}" if s is not None else "none" for s in statuses))
            assert None not in statuses, f"{called}: a C-FIND got no final answer: {statuses}"
            assert all(s == 0x0000 or s == 0xA900 or 0xC000 <= s <= 0xCFFF or s == 0xFE00 for s in statuses), statuses
        assert _ok(f"{base}/healthz") and node.poll() is None
    finally:
        stop_process(node)
    log = (tmp_path / "node.log").read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
