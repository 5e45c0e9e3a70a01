"""The REST API served beside the DICOM SCP (FastAPI + uvicorn in the node process).

``app`` (the application factory and health check), ``routes_*`` (studies, search, reports), ``auth`` and
``tokens`` (bearer tokens with scopes, stored hashed), ``audit`` (who looked up what), ``render`` (JSON and DICOM
JSON), ``server`` (uvicorn in a thread) and ``wiring`` (the node's services into the app).
"""
