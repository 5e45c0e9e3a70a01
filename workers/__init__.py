"""Celery workers (next issues): received study -> shared preprocessing -> ONNX bundle -> Qdrant.

Workers never import ``trainer``: the model bundle is their only contract with training.
"""
