"""Sending our Structured Reports to PACS by C-STORE, with bounded retries and a dead-letter state.

Each delivery (one SR file to one destination) lives in the state store. The worker attempts every due one;
a failure is retried after ``delivery_backoff_s`` × 2^(attempt-1) until ``delivery_attempts`` are spent, then
the delivery is *dead*: an operator lists it and retries it (``StateStore.retry_delivery``). Bounded retries
avoid the retry storms other routers suffered; deterministic SR UIDs make a repeated send harmless.

One association per send, proposing only the SR's own SOP class (picky PACS refuse associations that
propose everything) with Explicit and Implicit VR Little Endian. The file is sent byte for byte when the
peer accepts its transfer syntax, else re-encoded to the accepted one. Warning statuses (0xB000 coercion,
0xB006 elements discarded, 0xB007 data set does not match SOP class) mean the PACS stored it: delivered.

Destinations with ``tls: true``, and senders in ``node.allow`` with ``tls: true`` that take their results back,
are reached over TLS (BCP 195, :func:`dicom_node.tls.client_context`): their certificate is checked against
``node.tls.ca_file`` and must name the row's host (DNS name or IP address); ours is presented for peers that
require client certificates. A TLS failure is a failed attempt (retried).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from config import Settings
from dicom_node.store.state import DeliveryRow, DeliveryState, StateStore
from dicom_node.tls import client_context

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class SendResult:
    """What one send did: ``status`` is the C-STORE status as hex (``0x0000``) or why none came back
    (``no-association``, ``no-context``, ``no-response``, ``bad-file``, ``error``)."""

    delivered: bool
    status: str
    error: str | None = None


def send_file(path: Path, calling_ae: str, ae_title: str, host: str, port: int, timeout_s: float,
              tls: ssl.SSLContext | None = None) -> SendResult:
    """C-STORE one DICOM file to ``ae_title@host:port`` (over TLS with ``tls``, the peer checked as ``host``);
    never raises for network or peer failures."""
    path = Path(path)
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.MediaStorageSOPClassUID)
        file_syntax = str(meta.TransferSyntaxUID)
    except (OSError, InvalidDicomError, AttributeError) as error:
        return SendResult(False, "bad-file", f"cannot read {path.name}: {error}")

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    assoc = ae.associate(host, int(port), ae_title=ae_title, tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        why = "rejected the association" if assoc.is_rejected else "is unreachable or aborted the association"
        why += " (TLS: see the log for a handshake error)" if tls is not None and not assoc.is_rejected else ""
        return SendResult(False, "no-association", f"{ae_title}@{host}:{port} {why}")
    try:
        contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
        if not contexts:
            return SendResult(False, "no-context", f"{ae_title} accepted no presentation context for {sop_class}")
        if any(cx.transfer_syntax[0] == file_syntax for cx in contexts):
            payload: Path | pydicom.Dataset = path  # sent as stored, byte for byte
        else:
            payload = pydicom.dcmread(path)  # pynetdicom re-encodes it in the accepted syntax
        status = assoc.send_c_store(payload)
    except (OSError, ValueError, InvalidDicomError) as error:
        assoc.abort()
        return SendResult(False, "bad-file", f"cannot send {path.name}: {error}")
    except RuntimeError as error:  # the association dropped under us
        assoc.abort()
        return SendResult(False, "no-response", f"association with {ae_title} lost: {error}")
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:  # DIMSE timeout, abort or an invalid response
        return SendResult(False, "no-response", f"no C-STORE response from {ae_title} within {timeout_s:g} s")
    code = int(status.Status)
    text = f"0x{code:04X}"
    if code == SUCCESS or code in WARNING_STATUSES:
        return SendResult(True, text, None)
    comment = status.get("ErrorComment")
    return SendResult(False, text, f"C-STORE failed with status {text}" + (f": {comment}" if comment else ""))


def backoff_delay(base_s: float, attempts_made: int) -> float:
    """Seconds to wait after the ``attempts_made``-th failed attempt: base, 2×base, 4×base, ..."""
    return float(base_s) * (2 ** max(0, attempts_made - 1))


class DeliveryWorker:
    """Attempts due deliveries from the state store; one instance per node."""

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        # A row keeps the peer's address only: whether it speaks TLS is read from the configured destinations,
        # else from the allow-list entry the results went back to (its host is the sender's IP when it names none)
        self._destination_tls = {(d.ae_title, d.host, d.port): d.tls for d in settings.node.destinations}
        self._tls_sources = [(s.ae_title, s.host, s.port) for s in settings.node.allow if s.tls and s.port]
        self._tls_context: ssl.SSLContext | None = None

    def _wants_tls(self, row: DeliveryRow) -> bool:
        """A configured destination decides for its own address; else a ``tls: true`` allow-list source that
        matches the row's AE title and port (and host, when the entry names one)."""
        decided = self._destination_tls.get((row.ae_title, row.host, row.port))
        if decided is not None:
            return decided
        return any(ae_title == row.ae_title and port == row.port and host in (None, row.host)
                   for ae_title, host, port in self._tls_sources)

    def _tls_for(self, row: DeliveryRow) -> ssl.SSLContext | None:
        """The client TLS context when ``row`` goes to a TLS peer (built once, on first use)."""
        if not self._wants_tls(row):
            return None
        if self._tls_context is None:
            self._tls_context = client_context(self.settings.node.tls)
        return self._tls_context

    def _send(self, row: DeliveryRow) -> SendResult:
        path = Path(row.path)
        if not path.is_file():
            return SendResult(False, "bad-file", f"result file {path} is missing")
        node = self.settings.node
        try:
            return send_file(path, node.ae_title, row.ae_title, row.host, row.port, node.delivery_timeout_s,
                             tls=self._tls_for(row))
        except Exception as error:  # noqa: BLE001 - recorded as a failed attempt, so retries stay bounded
            logger.exception("event=delivery_error delivery_id=%d", row.id)
            return SendResult(False, "error", f"{type(error).__name__}: {error}")

    def run_once(self, now: float | None = None) -> int:
        """Attempt every delivery due at ``now``; returns how many were attempted."""
        node = self.settings.node
        attempted = 0
        for row in self.store.due_deliveries(time.time() if now is None else now):
            result = self._send(row)
            attempted += 1
            attempts = row.attempts + 1
            after = time.time() if now is None else now
            retry = (not result.delivered and result.status != "bad-file" and attempts < node.delivery_attempts)
            next_at = after + backoff_delay(node.delivery_backoff_s, attempts) if retry else None
            state = self.store.delivery_attempted(row.id, delivered=result.delivered, status=result.status,
                                                  error=result.error, next_attempt_at=next_at, now=after)
            if state is DeliveryState.DELIVERED:
                logger.info("event=delivery_done delivery_id=%d study_uid=%s sop_uid=%s destination=%s status=%s "
                            "attempt=%d", row.id, row.study_uid, row.sop_uid, row.destination, result.status, attempts)
            else:
                logger.warning("event=delivery_failed delivery_id=%d study_uid=%s sop_uid=%s destination=%s status=%s "
                               "attempt=%d state=%s retry_in_s=%s error=%r", row.id, row.study_uid, row.sop_uid,
                               row.destination, result.status, attempts, state,
                               f"{next_at - after:.1f}" if next_at is not None else "none", result.error)
        return attempted

    def run_forever(self, stop: threading.Event) -> None:
        """Poll for due deliveries until ``stop`` is set (the node's delivery thread)."""
        interval = self.settings.node.poll_interval_s
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - the loop must survive a bad row or a locked database
                logger.exception("event=delivery_loop_error")
                stop.wait(max(interval, 1.0))
            stop.wait(interval)
