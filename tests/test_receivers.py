"""Receiving processes (``node.receive_processes``) with real peers: dcmtk storescu/echoscu/findscu and pynetdicom
requestors against the node's StorageSCP with receiving processes, on 127.0.0.1. Each test checks where the
association was answered (the node's process or a receiving one), what the spool and state store hold, and what
the node's process learnt (studies in flight, the on_stored listener, answer counts)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from node_helpers import echoscu, nodelay_env, require_tools, wait_for
from pydicom import dcmread
from pynetdicom import AE, Association
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from receive_helpers import running_scp, send_dataset

from benchmarks.receive_throughput import generate_series
from dicom_node.metrics import routed_associations
from dicom_node.receive.ingest import STATUS_BAD_UIDS


def _series(folder: Path, slices: int = 12) -> list[Path]:
    generate_series(folder, slices, size=64)
    return sorted(folder.glob("*.dcm"))


def _associate(port: int, calling_ae: str, *contexts: str) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for context in contexts or (CTImageStorage, Verification):
        ae.add_requested_context(context)
    return ae.associate("127.0.0.1", port, ae_title="MEDFINDER")


def _recorded(node) -> int:
    return sum(len(node.store.instances(study.study_uid)) for study in node.store.studies())


def _open_per_process(node) -> list[int]:
    return [len(receiver.open) for receiver in node.scp.receivers._receivers]


def test_concurrent_senders_are_answered_by_the_processes_and_all_recorded(tmp_path: Path) -> None:
    """Four storescu at once: every instance spooled and recorded once, each association answered by a receiving
    process, the node's listener told of every instance (on_stored) and nothing left in flight."""
    require_tools("storescu", "echoscu")
    folders = [tmp_path / f"series-{index}" for index in range(4)]
    expected = sum(len(_series(folder)) for folder in folders)
    with running_scp(tmp_path / "node", receive_processes=2) as node:
        assert node.scp.receivers is not None
        routed_before = node.scp.receivers.routed
        senders = [subprocess.Popen(["storescu", "-aet", f"SCU{index}", "-aec", "MEDFINDER", "+sd", "127.0.0.1",
                                     str(node.port), str(folder)], stderr=subprocess.PIPE, text=True,
                                    env=nodelay_env()) for index, folder in enumerate(folders)]
        for sender in senders:
            assert sender.wait(timeout=60) == 0, sender.stderr.read() if sender.stderr else ""
        assert node.scp.receivers.routed - routed_before == 4
        assert len(list(node.layout.spool.glob("*/*/*.dcm"))) == expected
        assert _recorded(node) == expected
        wait_for(lambda: len(node.stored) == expected, 10, "every stored instance relayed to the node")
        assert len({record.sop_uid for record in node.stored}) == expected
        assert node.scp.ingestor.counts["stored"] == expected
        wait_for(lambda: not node.scp.studies_in_flight() and node.scp.receivers.open_associations() == 0, 10,
                 "the ended associations to leave the node's books")
        assert echoscu(node.port)  # verification alone is routed too
        assert node.scp.receivers.routed - routed_before == 5


def test_queries_and_report_srs_stay_in_the_node_process(tmp_path: Path) -> None:
    """A C-FIND association needs the node's store and model: it is answered by the node's process, while the
    instances it finds were received by a receiving process."""
    require_tools("storescu", "findscu")
    folder = tmp_path / "series"
    files = _series(folder, 6)
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running_scp(tmp_path / "node", receive_processes=1) as node:
        assert node.scp.receivers is not None
        result = subprocess.run(["storescu", "-aec", "MEDFINDER", "+sd", "127.0.0.1", str(node.port), str(folder)],
                                capture_output=True, text=True, timeout=60, env=nodelay_env())
        assert result.returncode == 0, result.stderr
        routed = node.scp.receivers.routed
        query = subprocess.run(["findscu", "-S", "-aec", "MEDFINDER", "-k", "QueryRetrieveLevel=STUDY",
                                "-k", f"StudyInstanceUID={study_uid}", "-k", "NumberOfStudyRelatedInstances",
                                "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60,
                               env=nodelay_env())
        assert query.returncode == 0, query.stderr
        assert study_uid in query.stderr + query.stdout
        assert node.scp.receivers.routed == routed, "a C-FIND association was routed to a receiving process"
        mixed = _associate(node.port, "MIXED", CTImageStorage, StudyRootQueryRetrieveInformationModelFind)
        assert mixed.is_established
        assert node.scp.receivers.routed == routed, "an association proposing C-FIND was routed"
        mixed.release()


def test_limit_counts_routed_associations_and_open_ones_keep_their_study_in_flight(tmp_path: Path) -> None:
    """max_associations = 2 with two associations held by two receiving processes: the third is rejected by the
    node (A-ASSOCIATE-RJ 2/3/2, local limit exceeded); the study sent on a held association stays in flight
    until that association ends, then a new one is accepted."""
    files = _series(tmp_path / "series", 2)
    dataset = dcmread(files[0])
    with running_scp(tmp_path / "node", receive_processes=2, max_associations=2) as node:
        first = _associate(node.port, "HOLD1")
        assert first.is_established
        assert first.send_c_store(dataset).Status == 0x0000
        second = wait_for(lambda: (a := _associate(node.port, "HOLD2")).is_established and a, 10, "association 2")
        assert sorted(_open_per_process(node)) == [1, 1], "the two associations went to one process"
        assert routed_associations() == 2  # the open-association gauge counts them
        assert wait_for(lambda: str(dataset.StudyInstanceUID) in node.scp.studies_in_flight(), 5, "in flight")
        third = _associate(node.port, "THIRD")
        assert third.is_rejected
        rejection = third.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x02, 0x03, 0x02)
        assert second.send_c_echo().Status == 0x0000
        first.release()
        wait_for(lambda: str(dataset.StudyInstanceUID) not in node.scp.studies_in_flight(), 10,
                 "the released association's study to leave the in-flight set")
        fourth = wait_for(lambda: (a := _associate(node.port, "FOURTH")).is_established and a, 10,
                          "an association after one was released")
        assert fourth.send_c_echo().Status == 0x0000
        fourth.release()
        second.release()
        assert _recorded(node) == 1


def test_a_killed_receiving_process_is_replaced_and_loses_nothing_stored(tmp_path: Path) -> None:
    """SIGKILL of the receiving process in the middle of an association: the sender's association ends, what
    was answered with success is in the spool and the state store, a new process takes the next association."""
    require_tools("storescu")
    files = _series(tmp_path / "series", 4)
    with running_scp(tmp_path / "node", receive_processes=1) as node:
        assert node.scp.receivers is not None
        held = _associate(node.port, "HOLD")
        assert held.is_established
        assert held.send_c_store(dcmread(files[0])).Status == 0x0000
        victim = node.scp.receivers._receivers[0].process
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: not held.is_established, 10, "the sender to see its association end")
        wait_for(lambda: node.scp.receivers.open_associations() == 0 and not node.scp.studies_in_flight(), 10,
                 "the lost association to leave the node's books")
        wait_for(lambda: node.scp.receivers._receivers[0].process.pid != victim.pid
                 and node.scp.receivers._receivers[0].process.is_alive(), 30, "a new receiving process")
        result = subprocess.run(["storescu", "-aec", "MEDFINDER", "+sd", "127.0.0.1", str(node.port),
                                 str(tmp_path / "series")], capture_output=True, text=True, timeout=60,
                                env=nodelay_env())
        assert result.returncode == 0, result.stderr
        assert _recorded(node) == len(files)
        assert len(list(node.layout.spool.glob("*/*/*.dcm"))) == len(files)


def test_allow_list_and_refusals_hold_in_a_receiving_process(tmp_path: Path) -> None:
    """The allow-list is checked where the association is answered; a malformed object refused there is
    quarantined with its reason and counted by the node as refused."""
    require_tools("echoscu")
    files = _series(tmp_path / "series", 1)
    with running_scp(tmp_path / "node", receive_processes=1, allow=[{"ae_title": "GOODSCU"}]) as node:
        routed = node.scp.receivers.routed
        assert not echoscu(node.port, calling_ae="BADSCU")
        assert echoscu(node.port, calling_ae="GOODSCU")
        assert node.scp.receivers.routed - routed == 2
        broken = dcmread(files[0])
        del broken.StudyInstanceUID
        assert send_dataset(node.port, broken, calling_ae="GOODSCU") == STATUS_BAD_UIDS
        quarantined = list(node.layout.quarantine.glob("*.reason.json"))
        assert len(quarantined) == 1 and str(broken.SOPInstanceUID) in quarantined[0].read_text()
        wait_for(lambda: node.scp.ingestor.counts["refused"] == 1, 5, "the refusal counted by the node")
        assert _recorded(node) == 0
