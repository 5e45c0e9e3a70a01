"""The DICOM face of MedFinder Node (next issues): C-STORE SCP, study assembly, SR results, queries, REST."""
