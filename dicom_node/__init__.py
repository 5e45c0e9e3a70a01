"""The node's DICOM face and its orchestration, in subpackages that follow the data's path:

``receive`` (storage SCP, validate-and-spool, quarantine, decoders) -> ``store`` (data-folder layout, SQLite
state) -> ``pipeline`` (study assembly, dispatch, outcome collection, indexing) -> ``report`` (the similar-case
SR, deterministic UIDs) -> ``deliver`` (C-STORE of results with retries). ``node`` wires them into one running
process; ``cli`` holds ``serve``/``studies``/``deliveries``.

May import: ``workers``, ``model_export``, ``config``. Never ``trainer`` or torch.
"""
