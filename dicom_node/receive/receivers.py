"""Receiving processes: storage associations handled in processes of their own, so concurrent senders use
several cores (``node.receive_processes``).

Why: pynetdicom runs every association as threads of one process, so all PDU decoding, DIMSE, header checks and
spool writes of all senders share one interpreter lock; eight concurrent senders got no more than one core's
worth (~150 MB/s here). With ``node.receive_processes: N`` the node's listener still accepts every connection.
In the connection's thread it reads the A-ASSOCIATE-RQ without consuming it (``MSG_PEEK``) and, when the
association proposes nothing but storage and verification, passes the connection itself (its file descriptor,
over a Unix socket) to the receiving process with the fewest open associations. That process answers the
association from the first byte with the node's own StorageSCP (same contexts, allow-list, limits, Ingestor,
its own connection to the one state store). Everything else stays in the node's process: queries (C-FIND needs
the model and the index), report SRs (attached to the node's reports), TLS connections (the handshake cannot be
peeked at), and any request that cannot be read in time or parsed.

The spool and the state store stay the source of truth; the pipe only tells the node, per C-STORE, the answer
(metrics) and the study (studies in flight), and when an association ends. A receiving process that dies is
started again, and its associations count as ended (their senders see the connection drop and resend).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import Settings
from dicom_node.metrics import count_routed_associations
from dicom_node.store.state import InstanceRecord

logger = logging.getLogger(__name__)

_ASSOCIATE_RQ = 0x01
_MAX_PEEKED_REQUEST = 256 * 1024  # bigger requests (hundreds of contexts) are answered in the node's process
_RESTART_DELAY_S = 1.0


# --- messages (typed; pickled over each process's pipe) ---------------------------------------------------------

@dataclass(frozen=True)
class RoutedConnection:
    """Node → receiving process: answer the association on the descriptor that follows."""

    association: int
    peer: tuple[str, int]


@dataclass(frozen=True)
class StoreAnswered:
    """Receiving process → node: one C-STORE answered."""

    association: int
    status: int
    duplicate: bool
    ignored: bool
    record: InstanceRecord | None  # what was spooled (success only)


@dataclass(frozen=True)
class AssociationEnded:
    """Receiving process → node: the routed association is over (released, aborted or refused)."""

    association: int


# --- reading the association request without consuming it ------------------------------------------------------

def peek_associate_request(connection: socket.socket, timeout_s: float) -> A_ASSOCIATE_RQ | None:
    """The A-ASSOCIATE-RQ waiting on ``connection``, left unread for whoever answers it; None when the first PDU is
    something else, too big, malformed or not complete within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    wanted = 6
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([connection], [], [], remaining)[0]:
            return None
        data = connection.recv(wanted, socket.MSG_PEEK)
        if not data:  # closed before a whole request arrived
            return None
        if wanted == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            if pdu_type != _ASSOCIATE_RQ or length + 6 > _MAX_PEEKED_REQUEST:
                return None
            wanted = length + 6
            continue
        if len(data) >= wanted:
            break
        time.sleep(0.001)  # part of the request is here; the rest is on its way (select stays readable)
    request = A_ASSOCIATE_RQ()
    try:
        request.decode(data)
    except Exception:  # noqa: BLE001 - garbage is for pynetdicom to refuse, in the node's process
        return None
    return request


def proposed_abstract_syntaxes(request: A_ASSOCIATE_RQ) -> set[str]:
    return {str(context.abstract_syntax) for context in request.presentation_context if context.abstract_syntax}


# --- the node's side ---------------------------------------------------------------------------------------------

class _Receiver:
    """The node's handle on one receiving process."""

    def __init__(self, index: int, process: multiprocessing.process.BaseProcess, pipe: Connection) -> None:
        self.index = index
        self.process = process
        self.pipe = pipe
        self.send_lock = threading.Lock()
        self.open: set[int] = set()


class ReceiverPool:
    """N receiving processes and the routing of storage associations to them.

    ``routable`` holds the abstract syntaxes a receiving process may be given (storage the node keeps or ignores,
    and verification); ``on_answer`` / ``on_ended`` are called in the pool's reader threads.
    """

    def __init__(self, settings: Settings, data_dir: Path, routable: Collection[str],
                 on_answer: Callable[[StoreAnswered], None], on_ended: Callable[[int], None]) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.routable = frozenset(routable)
        self.on_answer = on_answer
        self.on_ended = on_ended
        self._context = multiprocessing.get_context("spawn")  # the node has threads: no fork
        self._receivers: list[_Receiver] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.routed = 0  # associations handed to a receiving process so far
        self._stopping = threading.Event()
        self._uncount: Callable[[], None] | None = None

    # --- lifecycle ---

    def start(self, count: int) -> None:
        for index in range(count):
            self._receivers.append(self._spawn(index))
        deadline = time.monotonic() + 60
        for receiver in self._receivers:  # each says "ready" once its imports are done and its store is open
            if not receiver.pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"receiving process {receiver.index} did not start")
            receiver.pipe.recv()
        for receiver in self._receivers:
            self._follow(receiver)
        self._uncount = count_routed_associations(self.open_associations)
        logger.info("event=receive_processes_ready count=%d", count)

    def stop(self) -> None:
        self._stopping.set()
        if self._uncount is not None:
            self._uncount()
            self._uncount = None
        for receiver in self._receivers:
            try:
                with receiver.send_lock:
                    receiver.pipe.send(None)
            except OSError:
                pass
        for receiver in self._receivers:
            receiver.process.join(timeout=10)
            if receiver.process.is_alive():
                receiver.process.kill()
                receiver.process.join(timeout=5)
            receiver.pipe.close()

    def _spawn(self, index: int) -> _Receiver:
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(target=receiver_main, name=f"medfinder-receiver-{index}", daemon=True,
                                        args=(index, self.settings.model_dump(mode="json"), str(self.data_dir),
                                              theirs))
        process.start()
        theirs.close()
        return _Receiver(index, process, ours)

    def _follow(self, receiver: _Receiver) -> None:
        threading.Thread(target=self._read, args=(receiver,), name=f"receiver-{receiver.index}-events",
                         daemon=True).start()

    def _read(self, receiver: _Receiver) -> None:
        """Relay one receiving process's messages; start it again if it dies."""
        while True:
            try:
                message = receiver.pipe.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, StoreAnswered):
                self.on_answer(message)
            elif isinstance(message, AssociationEnded):
                with self._lock:
                    receiver.open.discard(message.association)
                self.on_ended(message.association)
        with self._lock:
            lost, receiver.open = receiver.open, set()
        for association in lost:
            self.on_ended(association)
        if self._stopping.is_set():
            return
        receiver.process.join(timeout=5)
        logger.error("event=receive_process_died index=%d exitcode=%s associations_lost=%d consequence=restart",
                     receiver.index, receiver.process.exitcode, len(lost))
        time.sleep(_RESTART_DELAY_S)
        if self._stopping.is_set():
            return
        replacement = self._spawn(receiver.index)
        if not replacement.pipe.poll(60):
            logger.error("event=receive_process_restart_failed index=%d", receiver.index)
            return
        replacement.pipe.recv()
        with self._lock:
            self._receivers[self._receivers.index(receiver)] = replacement
        self._follow(replacement)

    # --- routing ---

    def open_associations(self) -> int:
        with self._lock:
            return sum(len(receiver.open) for receiver in self._receivers)

    def takes(self, request: A_ASSOCIATE_RQ) -> bool:
        """Whether a receiving process may answer this association (storage and verification only)."""
        proposed = proposed_abstract_syntaxes(request)
        return bool(proposed) and proposed <= self.routable

    def route(self, connection: socket.socket, peer: tuple[str, int], *, room: int) -> bool:
        """Hand ``connection`` to the least busy receiving process; False (nothing sent) if none can take it or
        ``room`` (associations the node may still open besides the routed ones) is used up."""
        with self._lock:  # checked and taken at once: two connections arriving together cannot both pass
            alive = [receiver for receiver in self._receivers if receiver.process.is_alive()]
            if not alive or sum(len(receiver.open) for receiver in self._receivers) >= room:
                return False
            receiver = min(alive, key=lambda candidate: len(candidate.open))
            association = next(self._ids)
            receiver.open.add(association)
        try:
            with receiver.send_lock:
                receiver.pipe.send(RoutedConnection(association, (str(peer[0]), int(peer[1]))))
                send_handle(receiver.pipe, connection.fileno(), receiver.process.pid or 0)
        except OSError as error:
            with self._lock:
                receiver.open.discard(association)
            logger.error("event=route_failed index=%d error=%s", receiver.index, type(error).__name__)
            return False
        with self._lock:
            self.routed += 1
        return True


def open_acceptors(ae: Any) -> int:
    """Associations this process's pynetdicom AE has accepted and not yet ended."""
    return sum(1 for assoc in ae.active_associations if assoc.is_acceptor)


class RoutingAssociationServer(ThreadedAssociationServer):
    """The node's listener with receiving processes: storage-only associations go to one of them, the rest (and
    everything while the node's association limit is reached, so that the node itself refuses it) stay here."""

    receivers: ReceiverPool
    peek_timeout_s: float = 30.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._routed(request, client_address):
            request.close()  # the receiving process holds its own descriptor; no shutdown, which would end it
            return
        super().finish_request(request, client_address)

    def _routed(self, connection: socket.socket, peer: Any) -> bool:
        room = self.ae.maximum_associations - open_acceptors(self.ae)
        if self.receivers.open_associations() >= room:
            return False
        request = peek_associate_request(connection, self.peek_timeout_s)
        return (request is not None and self.receivers.takes(request)
                and self.receivers.route(connection, peer, room=room))


class DetachedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server that listens on nothing: a receiving process feeds it connections with
    ``process_request``."""

    def server_bind(self) -> None:
        """Nothing to bind: the node's process listens."""

    def server_activate(self) -> None:
        """Nothing to listen on."""

    def server_close(self) -> None:
        self.socket.close()


# --- the receiving process ---------------------------------------------------------------------------------------

class _Relay:
    """A receiving process's side of its pipe: routed connections in, answers and ends out (one writer at a time)."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        try:
            with self._lock:
                self.pipe.send(message)
        except OSError:  # the node is gone; this process ends with the pipe
            pass


def receiver_main(index: int, settings_data: dict[str, Any], data_dir: str, pipe: Connection) -> None:
    """A receiving process: a StorageSCP that listens on nothing and answers the connections the node passes."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for name in ("pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    import pydicom.config

    # pydicom validates every value it reads (a regex per UID): ~15% of a C-STORE's Python time here. What this
    # process acts on is checked by the header check and workers.dicom_uids, and it writes no DICOM itself.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    from dicom_node.receive.scp import StorageSCP
    from dicom_node.store.layout import NodeLayout
    from dicom_node.store.state import StateStore

    settings = Settings.model_validate(settings_data)
    layout = NodeLayout.create(Path(data_dir))
    store = StateStore(layout.state_db)
    relay = _Relay(pipe)
    scp = StorageSCP(settings, layout, store)
    scp.serve_routed(on_answer=relay.send, on_ended=lambda association: relay.send(AssociationEnded(association)))
    relay.send("ready")
    logger.info("event=receive_process_started index=%d", index)
    try:
        while True:
            try:
                routed = pipe.recv()
            except (EOFError, OSError):
                break  # the node is gone
            if routed is None:
                break
            descriptor = recv_handle(pipe)
            connection = socket.socket(fileno=descriptor)
            scp.answer_routed(connection, routed)
    finally:
        scp.stop()
        store.close()
        logger.info("event=receive_process_stopped index=%d counts=%s", index, dict(scp.ingestor.counts))
