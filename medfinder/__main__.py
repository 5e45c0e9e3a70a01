"""``python -m medfinder``: the ``medfinder`` command."""

from medfinder.cli import main

raise SystemExit(main())
