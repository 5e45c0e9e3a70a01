"""Report: an indexed study's similar cases (``reporting``) as a Comprehensive 3D SR (``similar_case_sr``) with
deterministic UIDs (``uids``), written to the results folder and queued for delivery."""
