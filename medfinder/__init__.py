"""The top of the tree: the ``medfinder`` command (:mod:`medfinder.cli`), assembled from every package's
subcommands. It may import any package; no package imports it."""
