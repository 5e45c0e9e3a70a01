"""What the node drives: received study -> series selection -> shared preprocessing -> ONNX bundle -> outcome.

``handoff`` (the typed request and outcome between node and worker, with the outcome's reader and writer),
``series_selection`` (which series of a study is embedded, and why), ``dicom_uids`` (UID validity, for
everything that takes a UID from outside), ``embed_study`` (the task body, the same
code in both modes), ``celery`` (its Celery app: ``celery -A workers worker``), ``dispatch`` (how the node hands
work over: threads or Celery), ``index`` (the vector index backends).

May import: ``model_export`` and ``config``. Never ``dicom_node`` (the hand-off names the folders a task reads
and writes) and never ``trainer``: the model bundle is the workers' only contract with training.
"""
