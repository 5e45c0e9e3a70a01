"""``python -m medfinder``: the ``medfinder`` command."""

from medfinder.cli import main

if __name__ == "__main__":  # a spawned receiving process imports this module again (node.receive_processes)
    raise SystemExit(main())
