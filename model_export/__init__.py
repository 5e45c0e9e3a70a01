"""The bundle contract between training and serving, torch-free.

``preprocessing`` (the ONE volume preprocessing), ``text_windows`` (report chunks), ``keyword_queries``,
``text_cleaning``, ``bundle_manifest`` (the typed manifest, hashes, verification), ``registry`` (installed and
active bundles), ``runtime`` (the ONNX serving runtime), ``atomic_files`` (the one atomic-write helper) and the
``preprocess``/``bundle`` commands. Making bundles from checkpoints is the trainer's (``trainer.export``).

May import: ``config`` only (and no torch).
"""
