"""MedFinder in PyTorch + MONAI: the top of the torch side, beside the node.

``model`` (image and text towers, fusion, losses), ``data`` (manifests, builders, synthetic benchmark,
augmentation), ``engine`` (training loop, checkpoints, DDP), ``evaluation`` (metrics, tables, ablations) and
``export`` (checkpoint -> ONNX graphs, parity check, the reference bundle), which writes bundles through
``model_export``'s format.

May import: ``model_export`` and ``config`` (and torch). Never ``workers`` or ``dicom_node``; nothing torch-free
imports this package.
"""
