"""Model export and the torch-free code that serving shares with training.

Torch-free: ``preprocessing`` (volumes), ``text_windows`` (report chunks), ``keyword_queries``, ``text_cleaning``, ``bundle_manifest``,
``registry`` and ``runtime`` (the serving runtime). Needs the ``train`` extra: ``onnx_export``, ``parity``,
``bundle_export`` and ``reference``. Importing this package imports none of them.
"""
