"""The node's model lifecycle: starting without a bundle, reindexing into a new collection while the active one
serves, the atomic switch and the rollback (``manager``), with the job table the ``medfinder reindex`` command
shares with the node (``jobs``), the loaded bundles (``slots``) and the follower collections kept in step
(``follower``). The command itself is ``cli``."""
