"""Store: the node's data folder (``layout``: spool, quarantine, outcomes, results, index) and its SQLite state
(``state``: instances, studies and their versions, deliveries), the source of truth a restart resumes from."""
