"""docs/conformance-statement.md against what the node really negotiates, both ways.

The statement's machine-readable tables (each after a ``<!-- conformance-table: NAME -->`` comment) are compared
with the presentation contexts the SCP's AE is built with (``StorageSCP.build_ae``, wired as the node wires it, for
both ``node.other_storage`` values), the SCU contexts of delivery and backfill, the C-FIND keys and private block,
and the setting defaults; then every listed SCP context is proposed to a real ``medfinder serve`` and must be
accepted, and unlisted ones (other transfer syntaxes, other query models) must be rejected. A statement that
claims too much or too little fails here, so code and document change together.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_helpers import free_port, start_node, stop_process, write_node_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import Comprehensive3DSRStorage, ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from config.loader import load_settings
from config.settings import Settings
from dicom_node.backfill.forward import NodeAddress, NodeSender
from dicom_node.deliver import delivery
from dicom_node.query import private_block
from dicom_node.query.identifier import STUDY_KEYS
from dicom_node.receive.report_sr import ReportReceiver
from dicom_node.receive.scp import StorageSCP
from dicom_node.report.companion import ENCAPSULATED_PDF_STORAGE
from dicom_node.store.layout import NodeLayout
from dicom_node.store.reports import ReportStore
from dicom_node.store.state import StateStore

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance-statement.md"
MARKER = re.compile(r"<!-- conformance-table: ([a-z0-9-]+) -->")
UID = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 odd IDs 1..255)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def doc_tables() -> dict[str, list[dict[str, str]]]:
    """Each marked table as rows of {column header: cell}."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    for number, line in enumerate(lines):
        match = MARKER.fullmatch(line.strip())
        if match is None:
            continue
        body = []
        for row in lines[number + 1:]:
            if not row.startswith("|"):
                break
            body.append(row)
        header, rows = _cells(body[0]), body[2:]
        assert match.group(1) not in tables, f"table {match.group(1)} twice"
        tables[match.group(1)] = [dict(zip(header, _cells(row), strict=True)) for row in rows]
    return tables


@pytest.fixture(scope="module")
def tables() -> dict[str, list[dict[str, str]]]:
    return doc_tables()


def uid_in(cell: str) -> str | None:
    found = UID.findall(cell)
    assert len(found) <= 1, cell
    return found[0] if found else None


def syntaxes(tables: dict, name: str) -> list[str]:
    """A named transfer syntax set, in the document's order."""
    rows = tables[f"transfer-syntaxes-{name}"]
    uids = [uid_in(row["UID"]) for row in rows]
    assert all(uids) and len(set(uids)) == len(uids), name
    return [str(uid) for uid in uids]


def documented_scp(tables: dict, other_storage: str) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes the document says the SCP accepts with ``other_storage``."""
    expected: dict[str, set[str]] = {}
    for row in tables["scp-contexts"]:
        accepted = set(syntaxes(tables, row["Transfer syntaxes"]))
        uid = uid_in(row["UID"])
        if row["Accepted"] == "always":
            assert uid is not None, row
            expected[uid] = accepted
        elif other_storage == "ignore":
            assert "other_storage: ignore" in row["Accepted"], row
            for other in tables["scp-other-storage"]:
                expected[str(uid_in(other["UID"]))] = accepted
    return expected


def node_settings(tmp_path: Path, **node: object) -> Settings:
    return load_settings(overrides={"paths": {"data_dir": str(tmp_path / "data")}, "node": node}, environ={})


def built_scp_contexts(settings: Settings) -> dict[str, list[str]]:
    """The SCP's supported contexts, built exactly as ``medfinder serve`` builds them (report SRs wired)."""
    layout = NodeLayout.create(settings.paths.data_dir)
    scp = StorageSCP(settings, layout, StateStore(layout.state_db))
    scp.ingestor.reports = ReportReceiver(settings, ReportStore(layout.reports), lambda *_: None)
    contexts: dict[str, list[str]] = {}
    for context in scp.build_ae().supported_contexts:
        assert context.abstract_syntax not in contexts, f"{context.abstract_syntax} offered twice"
        contexts[str(context.abstract_syntax)] = [str(ts) for ts in context.transfer_syntax]
    return contexts


@pytest.mark.parametrize("other_storage", ["ignore", "refuse"])
def test_scp_contexts_are_the_documented_ones(tables: dict, tmp_path: Path, other_storage: str) -> None:
    built = built_scp_contexts(node_settings(tmp_path, other_storage=other_storage))
    documented = documented_scp(tables, other_storage)
    assert not set(built) - set(documented), f"negotiated but not in the statement: {set(built) - set(documented)}"
    assert not set(documented) - set(built), f"in the statement but not negotiated: {set(documented) - set(built)}"
    for sop_class, accepted in built.items():
        assert set(accepted) == documented[sop_class], sop_class
    assert built[StudyRootQueryRetrieveInformationModelFind][0] == ExplicitVRLittleEndian  # "Explicit VR first"
    print(f"other_storage={other_storage}: {len(built)} SOP classes, "
          f"{sum(len(v) for v in built.values())} (class, transfer syntax) pairs, all documented")


def test_scu_contexts_are_the_documented_ones(tables: dict, tmp_path: Path) -> None:
    """Delivery proposes each result's own class with the delivery syntaxes; backfill uses pynetdicom's default
    syntaxes for Q/R and the *ct* set, per class, towards the node (and as C-GET SCP)."""
    delivered = {uid_in(row["UID"]): row["Transfer syntaxes"] for row in tables["scu-delivery"]}
    assert delivered == {str(Comprehensive3DSRStorage): "delivery", ENCAPSULATED_PDF_STORAGE: "delivery"}
    assert syntaxes(tables, "delivery") == [str(ts) for ts in delivery.TRANSFER_SYNTAXES]

    backfill = {uid_in(row["UID"]): row["Transfer syntaxes"] for row in tables["scu-backfill"]}
    query_models = {StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelMove,
                    StudyRootQueryRetrieveInformationModelGet}
    assert {uid for uid, name in backfill.items() if name == "native"} == query_models
    assert set(syntaxes(tables, "native")) == set(DEFAULT_TRANSFER_SYNTAXES)
    sender = NodeSender(NodeAddress("MEDFINDER", "127.0.0.1", 1), "MEDFINDER_BF", 5)
    proposed: dict[str, set[str]] = {}
    for context in sender._ae.requested_contexts:
        proposed.setdefault(str(context.abstract_syntax), set()).update(str(ts) for ts in context.transfer_syntax)
    assert proposed == {uid: set(syntaxes(tables, name)) for uid, name in backfill.items() if name == "ct"}
    assert set(syntaxes(tables, "any")) == {str(ts) for ts in ALL_TRANSFER_SYNTAXES}


def test_cfind_keys_and_private_block_are_the_documented_ones(tables: dict) -> None:
    rows = {row["Attribute"]: row for row in tables["cfind-keys"]}
    assert set(rows) == set(STUDY_KEYS), set(rows) ^ set(STUDY_KEYS)
    for keyword, row in rows.items():
        assert Tag(row["Tag"].strip("()").replace(",", "")) == Tag(tag_for_keyword(keyword)), keyword

    private = {row["Tag"]: row for row in tables["cfind-private"]}
    group = f"{private_block.PRIVATE_GROUP:04X}"
    response = Dataset()
    private_block.add_rank_and_score(response, rank=1, score=0.5)
    written = {f"({element.tag.group:04X},{element.tag.element:04X})": element for element in response}
    creator = written[f"({group},0010)"]
    assert creator.value == private_block.PRIVATE_CREATOR and f'"{creator.value}"' in private[f"({group},0010)"]["Name"]
    for element in (private_block.SCORE_ELEMENT, private_block.RANK_ELEMENT):
        tag = f"({group},10{element:02X})"
        assert private[tag]["VR"] == written[tag].VR, tag
    limit = f"({group},10{private_block.LIMIT_ELEMENT:02X})"
    assert private[limit]["VR"] == "US" and limit not in written
    assert set(private) == set(written) | {limit}


def test_ae_titles_and_association_defaults_are_the_settings_defaults(tables: dict) -> None:
    defaults = load_settings(environ={})

    def setting(path: str) -> object:
        value: object = defaults
        for part in path.strip("`").split("."):
            value = getattr(value, part)
        return value

    for row in tables["ae-titles"]:
        assert setting(row["Setting"]) == row["Default AE title"], row
    for row in tables["association-policy"]:
        value = setting(row["Setting"])
        if isinstance(value, bool):
            assert str(value).lower() == row["Default"], row
        else:
            assert float(value) == float(row["Default"]), row  # type: ignore[arg-type]


# --- against a real node ----------------------------------------------------------------------------------------

VERIFICATION = ("1.2.840.10008.1.1", "1.2.840.10008.1.2")  # in every batch: an association with no accepted
# context is aborted by pynetdicom's requestor, and a batch of unlisted pairs must still be answered


def _batches(pairs: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    size = MAX_CONTEXTS - 1
    for start in range(0, len(pairs), size):
        yield [VERIFICATION, *pairs[start:start + size]]


def negotiate(port: int, pairs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Propose each (SOP class, transfer syntax) as its own presentation context; the pairs accepted."""
    accepted: set[tuple[str, str]] = set()
    for batch in _batches(pairs):
        ae = AE(ae_title="CONFORMANCE")
        for sop_class, syntax in batch:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDFINDER")
        assert assoc.is_established, "the node refused the association"
        accepted |= {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        assoc.release()
    return accepted


def test_a_real_node_accepts_what_the_statement_lists_and_nothing_else(tables: dict, tmp_path: Path) -> None:
    documented = documented_scp(tables, "ignore")
    listed = sorted((sop_class, syntax) for sop_class, accepted in documented.items() for syntax in accepted
                    if sop_class not in {str(uid_in(row["UID"])) for row in tables["scp-other-storage"]})
    # Other storage: every class once (Explicit VR LE) and a compressed syntax on a few; all accepted and ignored.
    others = [str(uid_in(row["UID"])) for row in tables["scp-other-storage"]]
    listed += [(sop_class, ExplicitVRLittleEndian) for sop_class in others]
    listed += [(sop_class, "1.2.840.10008.1.2.4.50") for sop_class in others[:8]]
    unlisted = [(sop_class, str(syntax)) for sop_class in (*documented,) for syntax in ALL_TRANSFER_SYNTAXES
                if str(syntax) not in documented[sop_class]]
    unlisted += [(str(sop_class), ExplicitVRLittleEndian) for sop_class in (
        StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelFind, ModalityWorklistInformationFind)]

    config = write_node_config(tmp_path / "node.yaml", tmp_path / "data", None)
    port = free_port()
    node = start_node(config, port, tmp_path / "node.log", "--http-port", "0")
    try:
        accepted = negotiate(port, listed + unlisted)
    finally:
        stop_process(node)
    missing = set(listed) - accepted
    assert not missing, f"listed in the statement but rejected by the node: {sorted(missing)[:10]}"
    extra = set(unlisted) & accepted
    assert not extra, f"accepted by the node but not in the statement: {sorted(extra)[:10]}"
    print(f"real node: {len(listed)} listed contexts accepted, {len(unlisted)} unlisted rejected "
          f"({-(-(len(listed) + len(unlisted)) // (MAX_CONTEXTS - 1))} associations)")
