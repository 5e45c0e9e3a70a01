"""When an indexed study may be reported: after the studies that arrived alongside it are indexed too.

A PACS often pushes several studies at once; if each SR were built as soon as its own study was indexed, the
first SR of a batch could not name the others. So an indexed study waits while a study whose last instance
arrived within ``node.report_batch_window_s`` of its own is still receiving or being embedded.
"""

from __future__ import annotations

from dicom_node.store.state import StudyRow


def batch_mates_pending(study: StudyRow, unfinished: list[StudyRow], window_s: float) -> bool:
    """True while a study whose last instance arrived within ``window_s`` of this one's is not indexed yet.

    ``unfinished``: the studies still receiving or being embedded. The bound is per study (its own last arrival
    plus the window), so a steady stream of studies delays each SR by at most one window plus an embedding.
    """
    return any(other.study_uid != study.study_uid and other.last_received <= study.last_received + window_s
               for other in unfinished)
