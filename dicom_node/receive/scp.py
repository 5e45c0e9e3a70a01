"""The storage SCP PACS route CTs to: pynetdicom AE with Verification and CT storage, source control at
association, and a C-STORE handler that only validates and writes (:class:`dicom_node.receive.ingest.Ingestor`).

Source control happens during association negotiation, so an unknown source gets an A-ASSOCIATE-RJ
(permanent, "calling AE title not recognized") and never a chance to send: pynetdicom's own
``require_calling_aet`` checks the AE title only, so the acceptor's ACSE is extended, per association, to
check the (calling AE, peer IP) pair against ``node.allow`` before pynetdicom's own checks run. Storage
classes other than CT are negotiated only with ``node.other_storage: ignore`` (accepted, answered with success,
not kept); with ``refuse`` their presentation contexts are rejected during association negotiation. Radiology
report SRs (Basic Text, Enhanced, Comprehensive) are always accepted when the node wires a report receiver: they
are kept and attached to their study (:mod:`dicom_node.receive.report_sr`).

Queries: Study Root Query/Retrieve FIND on the same port, one ``EVT_C_FIND`` handler
(:class:`dicom_node.query.service.FindService`); the allow-list applies to them as to storage. The node answers
to two called AE titles, ``node.ae_title`` (ordinary study-level C-FIND) and ``query.similar_ae_title``
(similar cases): the acceptor takes on the title it was called by, so the handler knows which was asked.

Each association runs in its own thread (pynetdicom), so a C-ECHO is never queued behind another sender's
C-STOREs. With ``node.stream_to_disk`` pynetdicom writes each received dataset straight to a temp file (memory
stays flat for huge objects) and the handler moves that file into the spool. pynetdicom 3.0.4 puts it in the
system temp folder (``TMPDIR``): on the data folder's file system the move is a rename, elsewhere a copy.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.acse import ACSE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from config.settings import AllowedSource, Settings
from dicom_node.metrics import count_store
from dicom_node.query.service import FindService
from dicom_node.receive.acceptor import tune_association
from dicom_node.receive.codecs import ACCEPTED_TRANSFER_SYNTAXES, check_decoders
from dicom_node.receive.ingest import CT_STORAGE_CLASSES, Ingestor, IngestOutcome
from dicom_node.receive.receivers import (
    DetachedAssociationServer,
    ReceiverPool,
    RoutedConnection,
    RoutingAssociationServer,
    StoreAnswered,
    open_acceptors,
)
from dicom_node.receive.tls_server import TlsAssociationServer
from dicom_node.store.layout import NodeLayout
from dicom_node.store.state import InstanceRecord, StateStore
from dicom_node.tls import server_context
from workers.report_text import REPORT_SR_CLASSES
from workers.search import QueryEngine

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
FIND_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                          ExplicitVRBigEndian]


def _normal_ip(text: str) -> str:
    """An IP address in one canonical form (IPv4-mapped IPv6 as plain IPv4)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _resolve(host: str) -> set[str]:
    """The addresses of an allow-list host (an IP, or a name resolved once at start)."""
    try:
        return {_normal_ip(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as error:
        logger.error("event=allow_host_unresolved host=%s error=%r consequence='source refused'", host, str(error))
        return set()
    return {_normal_ip(str(info[4][0])) for info in infos}


class SourcePolicy:
    """The calling-AE allow-list with optional source IP binding (empty = everyone is allowed)."""

    def __init__(self, allow: list[AllowedSource]) -> None:
        # AE title -> allowed peer IPs (None = any IP)
        self._rules: dict[str, set[str] | None] = {}
        for source in allow:
            title = source.ae_title.strip()
            if source.host is None:
                self._rules[title] = None
            elif self._rules.get(title, set()) is not None:
                self._rules[title] = (self._rules.get(title) or set()) | _resolve(source.host)

    @property
    def open(self) -> bool:
        return not self._rules

    def refusal(self, calling_ae: str, peer_ip: str) -> str | None:
        """Why this source is refused, or None when it may associate."""
        if self.open:
            return None
        title = calling_ae.strip()
        if title not in self._rules:
            return "calling AE title not in the allow-list"
        addresses = self._rules[title]
        if addresses is None:
            return None
        try:
            ip = _normal_ip(peer_ip)
        except ValueError:
            return "peer address not an IP"
        return None if ip in addresses else "calling AE title not allowed from this IP address"


class _SourceCheckingACSE(ACSE):
    """pynetdicom's ACSE plus the (calling AE, peer IP) check, answered with A-ASSOCIATE-RJ; an association
    called by one of ``called_titles`` is accepted under that title (pynetdicom checks the called title against
    the acceptor's)."""

    policy: SourcePolicy
    called_titles: frozenset[str] = frozenset()
    routed_open: Callable[[], int] | None = None  # associations receiving processes hold (node.receive_processes)

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        calling_ae = str(getattr(request, "calling_ae_title", "") or "").strip()
        peer_ip = str(self.requestor.address)
        why = self.policy.refusal(calling_ae, peer_ip)
        if why is not None:
            # Rejected-permanent, source: service user, reason: calling AE title not recognized (PS3.8 9.3.4)
            self._reject(calling_ae, peer_ip, why, (0x01, 0x01, 0x03))
        elif self._over_limit():
            # pynetdicom counts this process's associations only; the limit is the node's, routed ones included.
            # Rejected-transient, source: service provider (presentation), reason: local limit exceeded.
            self._reject(calling_ae, peer_ip, "local limit exceeded", (0x02, 0x03, 0x02))
        else:
            called_ae = str(getattr(request, "called_ae_title", "") or "").strip()
            if called_ae in self.called_titles:
                self.acceptor.ae_title = called_ae
            super()._negotiate_as_acceptor()

    def _reject(self, calling_ae: str, peer_ip: str, why: str, result_source_reason: tuple[int, int, int]) -> None:
        self.requestor.ae_title = calling_ae
        logger.warning("event=association_rejected calling_ae=%s peer_ip=%s reason=%r", calling_ae, peer_ip, why)
        self.send_reject(*result_source_reason)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()

    def _over_limit(self) -> bool:
        if self.routed_open is None:
            return False
        return open_acceptors(self.assoc.ae) + self.routed_open() > self.assoc.ae.maximum_associations


def _request_handler(policy: SourcePolicy, called_titles: frozenset[str], *,
                     routed_open: Callable[[], int] | None = None,
                     on_create: Callable[[Any, socket.socket], None] | None = None,
                     incoming_dir: Path | None = None) -> type[RequestHandler]:
    """A pynetdicom request handler whose associations use :class:`_SourceCheckingACSE`; ``on_create`` sees each
    new association with its connection."""

    class SourceCheckingRequestHandler(RequestHandler):
        def _create_association(self) -> Any:
            # A DIMSE message leaves as several small writes (command, then data set): with Nagle on, each reply
            # to a peer that delays its ACKs waits ~40 ms (a C-FIND pending response, twice per round trip).
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assoc = super()._create_association()
            tune_association(assoc, incoming_dir)
            acse = _SourceCheckingACSE(assoc)
            acse.policy = policy
            acse.called_titles = called_titles
            acse.routed_open = routed_open
            assoc.acse = acse
            if on_create is not None:
                on_create(assoc, self.request)
            return assoc

    return SourceCheckingRequestHandler


class _SharedContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts, given to each new association without a copy.

    pynetdicom deep-copies the server's contexts for every association it accepts; with ``other_storage: ignore``
    that is ~170 contexts with all their transfer syntaxes, ~60 ms of CPU per association (measured). Acceptor
    negotiation only reads them (it builds new result contexts), so every association can share one list.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class StorageSCP:
    """The node's DICOM listener: ``start()`` returns once it accepts associations; ``stop()`` ends them."""

    def __init__(self, settings: Settings, layout: NodeLayout, store: StateStore,
                 on_stored: Callable[[InstanceRecord], None] | None = None) -> None:
        self.settings = settings
        self.layout = layout
        self.store = store
        self.on_stored = on_stored
        self.ingestor = Ingestor(settings, layout, store)
        self.policy = SourcePolicy(settings.node.allow)
        self.query_engine: QueryEngine | None = None  # set by the node; similar-case C-FIND needs it
        self.find = FindService(settings, store, lambda: self.query_engine)
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[Any, set[str]] = {}  # id(association), or a routed one's number -> study UIDs
        self.receivers: ReceiverPool | None = None  # node.receive_processes > 0 (plain TCP)
        # In a receiving process: the number the node gave each routed association, and where answers go.
        self._routed: dict[int, int] = {}  # id(connection), then id(association) -> the node's number
        self._on_answer: Callable[[StoreAnswered], None] | None = None
        self._on_ended: Callable[[int], None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return int(self._server.server_address[1])

    def build_ae(self) -> AE:
        """The pynetdicom AE with this node's contexts, limits and timeouts."""
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = node.require_called_ae_title
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.add_supported_context(VERIFICATION)
        # Explicit VR first: the private rank/score keep their VRs on the wire where the peer can take them.
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, FIND_TRANSFER_SYNTAXES)
        syntaxes = list(ACCEPTED_TRANSFER_SYNTAXES)
        for sop_class in CT_STORAGE_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        reports = self.ingestor.reports  # radiology report SRs are kept and attached (whatever other_storage says)
        report_classes = tuple(sorted(REPORT_SR_CLASSES)) if reports is not None else ()
        for sop_class in report_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        if node.other_storage == "ignore":
            for context in AllStoragePresentationContexts:
                if context.abstract_syntax not in CT_STORAGE_CLASSES + report_classes:
                    ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the SCP is already started")
        node = self.settings.node
        check_decoders()
        if self.policy.open:
            logger.warning("event=allow_list_empty consequence='any calling AE may send' "
                           "hint='set node.allow or --allow-ae AET[@IP]'")
        # pynetdicom's switch is process-wide: one process runs one StorageSCP (tests run them one at a time).
        _config.STORE_RECV_CHUNKED_DATASET = node.stream_to_disk
        _config.LOG_HANDLER_LEVEL = "none"  # pynetdicom's per-PDU/DIMSE log handlers: DEBUG detail we never keep
        self.layout.incoming.mkdir(parents=True, exist_ok=True)  # a data folder from before it existed
        ae = self.build_ae()
        # TLS (node.tls): handshakes in the connections' threads (dicom_node.receive.tls_server)
        ssl_context = server_context(node.tls) if node.tls.enabled else None
        if node.receive_processes and ssl_context is None:
            self.receivers = ReceiverPool(self.settings, self.layout.root, self._routable_classes(ae),
                                          self._routed_answer, self._routed_ended)
            self.receivers.start(node.receive_processes)
        elif node.receive_processes:
            logger.warning("event=receive_processes_off reason='TLS connections are answered in the node process'")
        request_handler = _request_handler(self.policy, self.find.called_titles, routed_open=(
            self.receivers.open_associations if self.receivers else None), incoming_dir=self.layout.incoming)
        server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer
        if ssl_context is not None:
            server_class = TlsAssociationServer
        elif self.receivers is not None:
            server_class = RoutingAssociationServer
        server = ae.make_server((node.bind, node.port), evt_handlers=self._handlers(), ssl_context=ssl_context,
                                server_class=server_class, request_handler=request_handler)
        server.contexts = _SharedContexts(server.contexts)
        if isinstance(server, TlsAssociationServer):
            server.handshake_timeout_s = node.acse_timeout_s
        if isinstance(server, RoutingAssociationServer):
            assert self.receivers is not None
            server.receivers = self.receivers
            server.peek_timeout_s = node.acse_timeout_s
        ae._servers.append(server)  # as ae.start_server() does, so that server.shutdown() and ae.shutdown() work
        self._ae = ae
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        self._thread.start()
        logger.info("event=scp_ready ae_title=%s similar_ae_title=%s bind=%s port=%d allow=%d other_storage=%s "
                    "max_associations=%d tls=%s receive_processes=%d", node.ae_title, self.find.similar_title,
                    node.bind, self.port, len(node.allow), node.other_storage, node.max_associations,
                    ("mutual" if node.tls.ca_file else "server-only") if ssl_context else "off",
                    node.receive_processes if self.receivers else 0)

    def _handlers(self) -> list[Any]:
        return [(evt.EVT_C_STORE, self._on_c_store), (evt.EVT_C_FIND, self.find.handle),
                (evt.EVT_CONN_CLOSE, self._on_conn_close)]

    def _routable_classes(self, ae: AE) -> set[str]:
        """What a receiving process may answer: the storage classes kept or ignored, and verification."""
        reports = set(REPORT_SR_CLASSES) if self.ingestor.reports is not None else set()
        return {str(context.abstract_syntax) for context in ae.supported_contexts
                if str(context.abstract_syntax) != StudyRootQueryRetrieveInformationModelFind
                and str(context.abstract_syntax) not in reports}

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        assert self._ae is not None
        if isinstance(server, DetachedAssociationServer):  # a receiving process: nothing listens
            for assoc in server.active_associations:
                assoc.abort()
            server.server_close()
            return
        self._ae.shutdown()  # aborts open associations, stops and closes the listening socket
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.receivers is not None:
            self.receivers.stop()
            self.receivers = None
        logger.info("event=scp_stopped counts=%s", dict(self.ingestor.counts))

    # --- receiving processes (dicom_node.receive.receivers) --------------------------------------------

    def serve_routed(self, on_answer: Callable[[StoreAnswered], None], on_ended: Callable[[int], None]) -> None:
        """In a receiving process: get ready to answer the connections the node routes here."""
        node = self.settings.node
        check_decoders()
        _config.STORE_RECV_CHUNKED_DATASET = node.stream_to_disk
        _config.LOG_HANDLER_LEVEL = "none"
        self.layout.incoming.mkdir(parents=True, exist_ok=True)
        ae = self.build_ae()
        self._on_answer, self._on_ended = on_answer, on_ended
        request_handler = _request_handler(self.policy, self.find.called_titles, on_create=self._routed_created,
                                           incoming_dir=self.layout.incoming)
        server = DetachedAssociationServer(ae, (node.bind, node.port), ae.ae_title, ae.supported_contexts,
                                           evt_handlers=self._handlers(), request_handler=request_handler)
        server.contexts = _SharedContexts(server.contexts)
        ae._servers.append(server)
        self._ae, self._server = ae, server

    def answer_routed(self, connection: socket.socket, routed: RoutedConnection) -> None:
        """In a receiving process: run the association on ``connection`` (in its own thread)."""
        assert isinstance(self._server, DetachedAssociationServer)
        with self._lock:
            self._routed[id(connection)] = routed.association
        self._server.server_address = connection.getsockname()
        self._server.process_request(connection, routed.peer)

    def _routed_created(self, assoc: Any, connection: socket.socket) -> None:
        with self._lock:
            number = self._routed.pop(id(connection), None)
            if number is not None:
                self._routed[id(assoc)] = number

    def _routed_answer(self, answer: StoreAnswered) -> None:
        """In the node: a receiving process answered a C-STORE."""
        outcome = IngestOutcome(answer.status, record=answer.record, duplicate=answer.duplicate,
                                ignored=answer.ignored)
        self.ingestor.count(outcome)
        self._answered(("routed", answer.association), outcome)

    def _answered(self, association: Any, outcome: IngestOutcome) -> None:
        """What follows every C-STORE answer, here or in a receiving process: studies in flight, listener,
        metrics."""
        if outcome.ok and outcome.record is not None:
            with self._lock:
                self._in_flight.setdefault(association, set()).add(outcome.record.study_uid)
            if not outcome.duplicate and self.on_stored is not None:
                try:
                    self.on_stored(outcome.record)
                except Exception:  # noqa: BLE001 - the object is stored; a listener's bug must not fail it
                    logger.exception("event=on_stored_error sop_uid=%s", outcome.record.sop_uid)
        count_store(outcome)  # metrics: instances by outcome and status

    def _routed_ended(self, association: int) -> None:
        with self._lock:
            self._in_flight.pop(("routed", association), None)

    def studies_in_flight(self) -> set[str]:
        """Study UIDs that received instances on associations still open (not yet complete)."""
        with self._lock:
            return set().union(*self._in_flight.values()) if self._in_flight else set()

    # --- handlers (run in the association's thread) ---------------------------------------------------

    def _on_c_store(self, event: Any) -> Dataset:
        assoc = event.assoc
        request = event.request
        calling_ae = str(assoc.requestor.ae_title).strip()
        peer_ip = str(assoc.requestor.address)
        arguments = {"calling_ae": calling_ae, "peer_ip": peer_ip,
                     "sop_class_uid": str(request.AffectedSOPClassUID or ""),
                     "sop_instance_uid": str(request.AffectedSOPInstanceUID or "")}
        source: Any = None  # the object as received, kept (quarantined) if handling it fails unexpectedly
        try:
            if self.settings.node.stream_to_disk:
                source = Path(event.dataset_path)
                outcome = self.ingestor.store_file(source, **arguments)
            else:
                source = event.encoded_dataset(include_meta=True)
                outcome = self.ingestor.store_encoded(source, **arguments)
        except Exception as error:  # noqa: BLE001 - a bug: not success, not 0xA700 (only for a real shortage)
            logger.exception("event=store_error calling_ae=%s sop_uid=%s", calling_ae,
                             arguments["sop_instance_uid"])
            outcome = self.ingestor.fail_unexpected(source, error, **arguments)
        self._answered(id(assoc), outcome)
        if self._on_answer is not None:  # a receiving process: tell the node
            with self._lock:
                number = self._routed.get(id(assoc))
            if number is not None:
                self._on_answer(StoreAnswered(number, outcome.status, outcome.duplicate, outcome.ignored,
                                              outcome.record if outcome.ok else None))
        response = Dataset()
        response.Status = outcome.status
        if outcome.comment and not outcome.ok:
            response.ErrorComment = outcome.comment[:64]
        return response

    def _on_conn_close(self, event: Any) -> None:
        with self._lock:
            studies = self._in_flight.pop(id(event.assoc), None)
            number = self._routed.pop(id(event.assoc), None)
        if number is not None and self._on_ended is not None:
            self._on_ended(number)
        if studies:
            logger.info("event=association_closed calling_ae=%s peer_ip=%s studies=%d",
                        str(event.assoc.requestor.ae_title).strip(), event.assoc.requestor.address, len(studies))
