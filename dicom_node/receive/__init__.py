"""Receive: the storage SCP (``scp``), its validate-and-spool step (``ingest``), the quarantine of refused objects
(``quarantine``) and the transfer syntaxes this install can decode (``codecs``)."""
