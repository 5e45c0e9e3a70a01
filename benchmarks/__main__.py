"""Run every benchmark and print its figures: ``python -m benchmarks`` (or ``make bench``)."""

import sys

from benchmarks import train_throughput

sys.exit(train_throughput.main(sys.argv[1:]))
