"""Deliver: C-STORE of the results to their destinations with bounded retries, then dead letters
(``delivery``)."""
