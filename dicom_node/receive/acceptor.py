"""Tuning of pynetdicom for the node's acceptor associations: wait on events instead of polling.

Why: profiling one association receiving 300 CT slices (~5 PDUs of 128 KB each) showed that most of the wall time
was polling latency, not work. pynetdicom's DUL reactor sleeps 1 ms after every loop that found nothing to do,
and the association reactor sleeps 1 ms before each look at the DIMSE message queue, so every PDU and every
C-STORE answer waited for a timer (1.08 s for 300 slices against ~0.3 s for dcmtk's storescp). The socket also
read each PDU in 4 KiB ``recv`` calls appended to a bytearray.

What :func:`tune_association` changes, per acceptor association and before its threads start:

* the DUL waits in ``poll``/``select`` on its socket *and* a wake-up socket pair, which is signalled whenever another
  thread hands it a primitive (``to_provider_queue``), an event or a kill; its wait is bounded
  (:data:`DUL_WAIT_S`) so the ARTIM timer is still seen; an SSL socket's already-decrypted bytes (invisible to
  ``select``) are checked first, as pynetdicom's ``AssociationSocket.ready`` does;
* the association reactor sleeps at its pause checkpoint until a DIMSE message or an ACSE primitive arrives (or the
  DUL ends, or :data:`REACTOR_WAIT_S` passes, which bounds the network idle timeout check), then runs the same
  checks as pynetdicom 3.0.4's ``Association._run_reactor``, in the same order;
* the socket reads a PDU with ``recv_into`` a preallocated buffer;
* a complete C-STORE request is served in the DUL thread as it completes (:class:`_StoreServingQueue`), not
  handed to the association thread: the peer waits for the answer anyway, and the hand-off (a wake-up, two
  context switches, the interpreter lock changing hands twice) was the largest cost with several associations
  in one process;
* with the polling gone, pydicom work per C-STORE showed next: pynetdicom builds and encodes a pydicom Dataset for
  each file meta header it writes (~0.2 ms) and for each C-STORE response (~0.3 ms). Both are written directly
  here, byte for byte what pynetdicom writes (tests/test_acceptor.py compares them), and anything unusual still
  takes pynetdicom's path.

Measured (300 CT slices on one association, 2 cores): 1.17 s before, 0.6 s after, dcmtk storescp ~0.3 s.

This relies on pynetdicom 3.0.4 internals (``DULServiceProvider._is_transport_event``, ``_run_loop_delay``, the
queues of the DUL and DIMSE providers, ``Association._run_reactor``/``_reactor_checkpoint``/``_is_paused``,
``DIMSEMessage.decode_msg``'s C-STORE-RQ steps, ``DIMSEServiceProvider.send_msg``), which is why pyproject pins
pynetdicom==3.0.4: re-read them before moving the pin.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any, cast

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

logger = logging.getLogger(__name__)

DUL_WAIT_S = 0.05  # longest DUL wait with nothing signalled: only the ARTIM timer is not signalled
REACTOR_WAIT_S = 0.02  # longest reactor wait: bounds how late the network idle timeout is noticed
_HAS_POLL = hasattr(select, "poll")
_ELEMENT_HEAD = struct.Struct("<HHI")  # Implicit VR Little Endian: group, element, value length
_US = struct.Struct("<H")
_UL = struct.Struct("<I")
_META_SHORT_HEAD = struct.Struct("<HH2sH")  # Explicit VR Little Endian: group, element, VR, 2-byte length
_META_LONG_HEAD = struct.Struct("<HH2s2xI")  # ... OB/OW/SQ/UN...: VR, 2 reserved bytes, 4-byte length


class _SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``on_put`` after each put, so its consumer can block on something else meanwhile."""

    on_put: Callable[[], None]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.on_put()


class _StoreServingQueue(_SignallingQueue):
    """The DIMSE message queue of an acceptor that serves each complete C-STORE request where it completes, in
    the DUL thread, instead of queueing it for the association thread.

    Why: the peer waits for each answer (no asynchronous operations are negotiated), so the hand-off gains
    nothing, and it costs a wake-up, two context switches and the interpreter lock changing hands twice per
    instance; with several associations in one process that was the largest single cost (profiled). The
    answer is queued for the DUL as before. Anything else (C-ECHO, C-FIND, a request on a context that was not
    accepted, anything during release) is queued for the association thread as pynetdicom does."""

    serve: Callable[[Any, int], None]
    accepted: Callable[[int], bool]

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, primitive = item
        if type(primitive) is C_STORE and primitive.MessageID is not None and self.accepted(context_id):
            self.serve(primitive, context_id)
            return
        super().put(item, block, timeout)


def _signalling(target: queue.Queue, on_put: Callable[[], None]) -> None:  # type: ignore[type-arg]
    """Turn an existing (possibly non-empty) queue into a :class:`_SignallingQueue` in place: items kept."""
    target.__class__ = _SignallingQueue
    cast(_SignallingQueue, target).on_put = on_put


class _IntoSocket(AssociationSocket):
    """``recv`` into one preallocated buffer with reads as large as what is missing (pynetdicom: 4 KiB reads
    appended to a bytearray). Same contract: blocks until ``nr_bytes`` arrived; fewer only if the peer closed."""

    def recv(self, nr_bytes: int) -> bytearray:
        raw = cast(socket.socket, self.socket)
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                count = raw.recv_into(view[got:], nr_bytes - got)
                if not count:
                    break
                got += count
        if got < nr_bytes:
            del buffer[got:]
        return buffer


class _WakingDUL(DULServiceProvider):
    """A DUL whose reactor blocks on its socket plus a wake-up socket pair instead of sleeping 1 ms per idle loop.

    The socket pair exists only while the DUL thread runs (made in :meth:`run`, closed when it ends), so no
    association can leak it; a signal before or after that is a no-op (nothing waits then)."""

    _wake_lock: threading.Lock
    _wake_pair: tuple[socket.socket, socket.socket] | None
    _on_end: Callable[[], None]

    def run(self) -> None:
        pair = socket.socketpair()
        for end in pair:
            end.setblocking(False)
        with self._wake_lock:
            self._wake_pair = pair
        try:
            super().run()
        finally:
            with self._wake_lock:
                self._wake_pair = None
            for end in pair:
                end.close()
            self._on_end()

    def wake(self) -> None:
        """Interrupt the reactor's wait (from another thread); one pending byte is enough."""
        if threading.get_ident() == self.ident:
            return  # the reactor itself: it checks its queues and kill flag before it waits
        with self._wake_lock:
            if self._wake_pair is not None:
                try:
                    self._wake_pair[1].send(b"\0")
                except OSError:  # full (a wake-up is already pending) or closing
                    pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        """pynetdicom's ``stop_dul``, but joins the thread (it spins on ``_run_loop_delay``, 0 here)."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self.wake()
        if threading.current_thread() is not self:
            self.join()
        return True

    def _is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data, but blocking (bounded) while there is nothing else to do."""
        if self.state_machine.current_state == "Sta13":
            return super()._is_transport_event()  # closing: read what is left, then close (never waits)
        sock = cast(AssociationSocket, self.socket)
        raw = sock.socket if sock is not None and sock._is_connected else None
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            self._read_pdu_data()  # decrypted bytes already buffered: select would not see them
            return True
        busy = self._kill_thread or bool(self.event_queue.queue) or bool(self.to_provider_queue.queue)
        readable = self._wait(raw, 0.0 if busy else self._wait_s())
        if readable is None:
            self.event_queue.put("Evt17")  # as AssociationSocket.ready: a socket select rejects is closed
            return False
        if readable:
            self._read_pdu_data()
            return True
        if self.to_provider_queue.queue:  # woken for a primitive: queue its event now, not after a sleep(0)
            self._process_recv_primitive()
        return False

    def _wait_s(self) -> float:
        """How long to wait: bounded, and no later than the ARTIM timer's expiry while it runs (a stopped
        timer's ``remaining`` is frozen, so only a running one counts)."""
        artim = self.artim_timer
        if artim.timeout is not None and artim._start_time is not None and artim._end_time is None:
            return max(0.0, min(DUL_WAIT_S, artim.remaining))
        return DUL_WAIT_S

    def _wait(self, raw: socket.socket | None, timeout: float) -> bool | None:
        """Wait until ``raw`` is readable, a wake-up arrives or ``timeout`` passes; True if ``raw`` is readable,
        None if ``raw`` is unusable (closed)."""
        pair = self._wake_pair
        wake_fd = pair[0].fileno() if pair is not None else -1
        raw_fd = raw.fileno() if raw is not None else -1
        if raw is not None and raw_fd < 0:
            return None  # closed under us
        fds = [fd for fd in (raw_fd, wake_fd) if fd >= 0]
        if not fds:
            if timeout:
                time.sleep(timeout)
            return False
        try:
            if _HAS_POLL:
                poller = select.poll()
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                ready = {fd for fd, _ in poller.poll(int(timeout * 1000 + 0.999))}
            else:
                ready = set(select.select(fds, [], [], timeout)[0])
        except (OSError, ValueError):
            return None if raw_fd >= 0 else False
        if wake_fd in ready and pair is not None:
            try:
                while pair[0].recv(4096):
                    pass
            except OSError:  # drained (would block)
                pass
        return raw_fd in ready


def _store_response_command(primitive: Any) -> bytes | None:
    """The command set of a plain C-STORE response (status only, no comment or offending element), Implicit VR
    Little Endian, element for element as pynetdicom encodes it; None for anything else (pynetdicom encodes it)."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None or primitive.Status is None:
        return None
    if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
        return None
    if getattr(primitive, "_dataset_path", None) is not None:
        return None
    numbers = (int(primitive.MessageIDBeingRespondedTo), int(primitive.Status))
    if not all(0 <= number <= 0xFFFF for number in numbers):
        return None
    try:
        uids = [None if uid is None else str(uid).encode("ascii")
                for uid in (primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID)]
    except UnicodeEncodeError:
        return None
    parts = []
    for tag, value in ((0x0002, uids[0]), (0x0100, _US.pack(0x8001)), (0x0120, _US.pack(numbers[0])),
                       (0x0800, _US.pack(0x0101)), (0x0900, _US.pack(numbers[1])), (0x1000, uids[1])):
        if value is None:
            continue  # pynetdicom leaves out an element whose parameter is unset
        if len(value) % 2:
            value += b"\0"  # UI pads with NUL
        parts.append(_ELEMENT_HEAD.pack(0x0000, tag, len(value)) + value)
    body = b"".join(parts)
    return _ELEMENT_HEAD.pack(0x0000, 0x0000, 4) + _UL.pack(len(body)) + body


def _explicit_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One (0002,eeee) element, Explicit VR Little Endian (OB has the 4-byte length form)."""
    if vr == b"OB":
        return _META_LONG_HEAD.pack(0x0002, element, vr, len(value)) + value
    return _META_SHORT_HEAD.pack(0x0002, element, vr, len(value)) + value


def _ui(value: Any) -> bytes | None:
    """A UI value as pydicom writes it (NUL-padded to even length); None if not one plain ASCII UID."""
    if not isinstance(value, str) or not value or "\\" in value or len(value) > 64 or not value.isascii():
        return None
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def store_file_header(sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> bytes | None:
    """Preamble, ``DICM`` and the file meta group pynetdicom writes before a received C-STORE data set (its
    ``create_file_meta`` + pydicom's ``write_file_meta_info``), byte for byte; None when a UID is not plain."""
    uids = [_ui(uid) for uid in (sop_class_uid, sop_instance_uid, transfer_syntax, PYNETDICOM_IMPLEMENTATION_UID)]
    if any(uid is None for uid in uids):
        return None
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    version += b" " * (len(version) % 2)  # SH pads with a space
    body = b"".join([_explicit_element(0x0001, b"OB", b"\x00\x01"),
                     *(_explicit_element(tag, b"UI", cast(bytes, uid))
                       for tag, uid in zip((0x0002, 0x0003, 0x0010, 0x0012), uids, strict=True)),
                     _explicit_element(0x0013, b"SH", version)])
    return b"\0" * 128 + b"DICM" + _explicit_element(0x0000, b"UL", _UL.pack(len(body))) + body


class _QuickStoreMessage(DIMSEMessage):
    """A DIMSE message being received whose C-STORE-RQ file header is written without pydicom: pynetdicom builds a
    file meta Dataset and has pydicom encode it, ~0.2 ms per instance. Only the P-DATA that completes a C-STORE-RQ
    command (alone in it) is taken here; every other fragment, and anything unusual, is pynetdicom's."""

    incoming_dir: Path | None = None  # None: the system temp folder, as pynetdicom

    def decode_msg(self, primitive: Any, assoc: Any = None) -> bool:
        if not self._start_store_file(primitive, assoc):
            return bool(super().decode_msg(primitive, assoc))
        return False  # the data set follows

    def _start_store_file(self, primitive: Any, assoc: Any) -> bool:
        """Do what pynetdicom does on the last command fragment of a C-STORE-RQ with a data set streamed to
        disk (command decoded, message typed, temp file opened with the same name pattern and header)."""
        if not _config.STORE_RECV_CHUNKED_DATASET or type(primitive) is not P_DATA or assoc is None:
            return False
        values = primitive.presentation_data_value_list
        if len(values) != 1 or values[0][1][:1] != b"\x03":  # one PDV: the last command fragment
            return False
        context_id, data = values[0]
        context = assoc._accepted_cx.get(context_id)
        if context is None:
            return False
        command = decode(BytesIO(self.encoded_command_set.getvalue() + data[1:]), True, True)
        if command.get("CommandField") != 0x0001 or command.get("CommandDataSetType") in (None, 0x0101):
            return False
        header = store_file_header(command.get("AffectedSOPClassUID"), command.get("AffectedSOPInstanceUID"),
                                   context.transfer_syntax[0])
        if header is None:
            return False
        self.encoded_command_set.write(data[1:])
        self.context_id = context_id
        self.command_set = command
        self.__class__ = C_STORE_RQ
        # As pynetdicom names it, in the node's incoming folder (same file system as the spool: the handler's move is
        # a rename); it outlives this call (pynetdicom closes it after the handler).
        target = NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm", dir=self.incoming_dir)  # noqa: SIM115
        self._data_set_file = target
        self._data_set_path = Path(target.name)
        target.write(header)
        return True


class _QuickStore(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with two shortcuts for C-STORE, each the same bytes as pynetdicom's own path:
    received requests start as :class:`_QuickStoreMessage`, and a plain response is encoded directly."""

    incoming_dir: Path | None = None

    def receive_primitive(self, primitive: Any) -> None:
        if self.message is None:
            message = DIMSEMessage()
            message.__class__ = _QuickStoreMessage  # after DIMSEMessage's own __init__ (it keys on the class name)
            message.incoming_dir = self.incoming_dir
            self.message = message
        super().receive_primitive(primitive)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """A plain C-STORE response without building a pydicom command Dataset (building and encoding one cost
        ~0.3 ms per instance); pynetdicom's path when the response carries more, needs fragments, or someone
        listens to ``EVT_DIMSE_SENT`` (which wants the message object) other than pynetdicom's log handler."""
        listeners = self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        quiet = all(handler is standard_dimse_sent_handler for handler, _ in listeners)  # it logs no C-STORE-RSP
        command = _store_response_command(primitive) if quiet else None
        limit = self.maximum_pdu_size
        if command is None or (limit and len(command) > limit - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
        self.dul.send_pdu(pdata)


class _EventDrivenAssociation(Association):
    """An acceptor whose reactor waits for messages at its checkpoint instead of sleeping 1 ms per loop."""

    _reactor_wake: threading.Event

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop, in the same order, with the 1 ms sleep replaced by a wait that ends
        as soon as a DIMSE message or an ACSE primitive is queued, or the DUL ends."""
        wake = self._reactor_wake
        msg_queue = self.dimse.msg_queue
        user_queue = self.dul.to_user_queue
        self._is_paused = False
        while not self._kill:
            # Paused while waiting: whoever clears the checkpoint (release(), send_*()) may proceed at once,
            # and the checkpoint is passed before any queue is touched.
            self._is_paused = True
            if not msg_queue.queue and not user_queue.queue:
                wake.wait(REACTOR_WAIT_S)
            wake.clear()  # before the checks: a put after this sets it again for the next wait
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.debug("event=association_released peer_ip=%s", self.requestor.address)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                logger.info("event=association_aborted peer_ip=%s provider=%s", self.requestor.address,
                            self.acse.is_aborted("a-p-abort"))
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                logger.warning("event=network_timeout peer_ip=%s timeout_s=%s response=%s", self.requestor.address,
                               self.network_timeout, self.network_timeout_response)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def tune_association(assoc: Association, incoming_dir: Path | None = None) -> None:
    """Make a freshly created acceptor association event-driven (see the module docstring); call it before the
    association is started. Anything else (a requestor, an association already running) is left as it is.
    ``incoming_dir`` is where received objects are streamed before they are checked and moved: a folder on the
    spool's file system makes that move a rename (pynetdicom uses the system temp folder)."""
    if type(assoc) is not Association or not assoc.is_acceptor or assoc.is_alive():
        return
    dul = assoc.dul
    if type(dul) is not DULServiceProvider or dul.is_alive():
        return
    wake = threading.Event()
    dul.__class__ = _WakingDUL
    waking = cast(_WakingDUL, dul)
    waking._wake_lock = threading.Lock()
    waking._wake_pair = None
    waking._on_end = wake.set
    waking._run_loop_delay = 0  # the wait happens in _is_transport_event
    _signalling(dul.to_provider_queue, waking.wake)
    _signalling(dul.event_queue, waking.wake)
    _signalling(dul.to_user_queue, wake.set)
    _signalling(assoc.dimse.msg_queue, wake.set)
    serving = assoc.dimse.msg_queue
    serving.__class__ = _StoreServingQueue
    cast(_StoreServingQueue, serving).serve = assoc._serve_request
    cast(_StoreServingQueue, serving).accepted = (
        lambda context_id: context_id in assoc._accepted_cx and not assoc._sent_release and assoc.is_established)
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = _IntoSocket
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = _QuickStore
        cast(_QuickStore, assoc.dimse).incoming_dir = incoming_dir
    assoc.__class__ = _EventDrivenAssociation
    cast(_EventDrivenAssociation, assoc)._reactor_wake = wake


__all__ = ["tune_association"]
