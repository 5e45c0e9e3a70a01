"""The DICOM face of MedFinder Node: storage SCP, spool and state, study assembly, series selection, the
similar-case Structured Report and its delivery, and the ``serve``/``studies``/``deliveries`` commands."""
