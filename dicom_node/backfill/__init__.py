"""``medfinder backfill``: fill a running node from the archive (C-FIND day by day, then C-MOVE / C-GET, or
Orthanc's REST API), resumable, paced, and quiet (no SR) unless asked.

Modules: :mod:`.schedule` (days, daily window, pacing), :mod:`.progress` (the backfill's own SQLite store),
:mod:`.dimse` (the PACS over DIMSE), :mod:`.orthanc_source` (Orthanc over REST), :mod:`.forward` (C-STORE to the
node), :mod:`.runner` (the loop), :mod:`.cli` (the subcommand).
"""
