"""Orthanc integration: the configuration generator and the thin plugin it installs (``plugin/``)."""
