"""Run every benchmark and print its figures: ``python -m benchmarks`` (or ``make bench``).

``python -m benchmarks NAME [ARGS...]`` runs one of them with its own arguments, e.g.
``python -m benchmarks train_throughput --paper``, ``python -m benchmarks bundle_inference --no-paper`` or
``python -m benchmarks search --sizes 20000`` or ``python -m benchmarks ui_page --views 7``.
"""

import sys

from benchmarks import (
    backfill,
    bundle_inference,
    receive_throughput,
    reindex,
    search,
    study_latency,
    train_throughput,
    ui_page,
)

BENCHMARKS = {"train_throughput": train_throughput, "bundle_inference": bundle_inference,
              "receive_throughput": receive_throughput, "study_latency": study_latency, "search": search,
              "ui_page": ui_page, "backfill": backfill, "reindex": reindex}



def main() -> int:
    arguments = sys.argv[1:]
    if arguments:
        if arguments[0] not in BENCHMARKS:
            sys.exit(f"usage: python -m benchmarks [{' | '.join(BENCHMARKS)} [ARGS...]]")
        return int(BENCHMARKS[arguments[0]].main(arguments[1:]))
    status = 0
    for module in BENCHMARKS.values():
        status |= module.main([])
        print()
    return status


if __name__ == "__main__":  # receive_throughput's receiving processes are spawned and import this module again
    sys.exit(main())
