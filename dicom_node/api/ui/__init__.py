"""The "Similar cases" pages: server-rendered HTML under ``/ui`` on the node's REST port (no JS build, no CDN).

``routes`` (the pages), ``access`` (bearer, session cookie or signed link; browsers are sent to the login form),
``signing`` (the node's page key, session cookies and signed links), ``cards`` (search results as what a card
shows), ``templates/`` and ``static/ui.css``.
"""
