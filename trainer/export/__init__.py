"""The torch side of making a model bundle: a checkpoint -> ONNX graphs (``onnx_export``), the parity check
against PyTorch (``parity``), the bundle folder with its manifest (``bundle_export``, through
``model_export.bundle_manifest``), the demo reference bundle (``reference``) and their commands (``cli``)."""
