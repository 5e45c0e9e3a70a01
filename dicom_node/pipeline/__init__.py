"""Pipeline: quiet studies become embed requests, worker outcomes become index points, indexed studies reports.

``pipeline`` runs the passes, ``indexing`` turns an outcome into an index point and a study state,
``batching`` decides when an indexed study may be reported. Imports the stages beside it (store, report) and
``workers`` (dispatch, hand-off, index).
"""

from dicom_node.pipeline.pipeline import Pipeline

__all__ = ["Pipeline"]
