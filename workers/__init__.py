"""Embedding workers: received study -> series selection -> shared preprocessing -> ONNX bundle -> outcome.

``workers.embed_study`` is the task body (the same code in both modes); ``workers.celery`` its Celery app
(``celery -A workers worker``); ``workers.dispatch`` how the node hands work over; ``workers.index`` the vector
index backends. Workers never import ``trainer``: the model bundle is their only contract with training.
"""
