"""Importers: pretrained encoders from other projects -> MedFinder model bundles (``medfinder import``).

Each importer rebuilds the published model from local files only (never a hub call), exports its towers to
ONNX with :mod:`trainer.export.onnx_export`, writes a manifest whose recipes are the source model's own, and
checks onnxruntime against PyTorch before the bundle is placed.
"""
