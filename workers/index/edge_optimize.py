"""A background HNSW build's child process: load a copy of the shard, optimise it, close it, report.

Why a process: ``EdgeShard.optimize()`` holds Python's GIL for the whole build (measured: a ticker thread ran once
in a 12 s build), so optimising in a thread of the node would stall every search for minutes. The node therefore
copies its shard, runs this script on the copy at a lower CPU priority, keeps answering from its live shard
(exact search), and swaps the built copy in afterwards (``workers.index.edge``).

Run by path, ``python edge_optimize.py SHARD_FOLDER RESULT_JSON``: it imports only the standard library and
qdrant_edge, so it needs neither the project installed nor its settings (the copy carries its own
edge_config.json). The result file records wall-clock start and end of ``optimize()`` (tests use them to prove
searches were answered meanwhile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NICENESS = 10  # the build yields the CPU to searches and ingest


@dataclass(frozen=True)
class OptimizeResult:
    """What the child reported: when optimize() ran (time.time()), and the built shard's counts."""

    started: float
    finished: float
    points: int
    indexed_vectors: int
    segments: int

    @property
    def seconds(self) -> float:
        return self.finished - self.started


class OptimizeFailed(RuntimeError):
    """The child process failed (its exit status and the tail of its error output are in the message)."""


def run_optimizer(shard: Path, result_path: Path, started: Callable[[subprocess.Popen], None]) -> OptimizeResult:
    """Optimise the shard folder ``shard`` in a child process and wait for it (the wait releases the GIL).

    ``started`` receives the process as soon as it runs, so the caller can terminate it (index closing).
    """
    # -P: this script's folder (workers/index) is not put on sys.path, so its modules cannot shadow others.
    process = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()), str(shard), str(result_path)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started(process)
    _, stderr = process.communicate()
    if process.returncode != 0:
        tail = stderr.decode("utf-8", "replace")[-800:].strip()
        raise OptimizeFailed(f"optimizer process exited with {process.returncode}: {tail}")
    data = json.loads(result_path.read_text(encoding="utf-8"))
    return OptimizeResult(**data)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: edge_optimize.py SHARD_FOLDER RESULT_JSON", file=sys.stderr)
        return 2
    shard_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        os.nice(NICENESS)
    except OSError:  # not permitted here: build at normal priority
        pass
    import qdrant_edge as qe

    shard = qe.EdgeShard.load(str(shard_path))
    try:
        started = time.time()
        shard.optimize()
        finished = time.time()
        shard.flush()
        info = shard.info()
        result = {"started": started, "finished": finished, "points": int(info.points_count),
                  "indexed_vectors": int(info.indexed_vectors_count), "segments": int(info.segments_count)}
    finally:
        shard.close()
    temporary = result_path.with_name(f".{result_path.name}.tmp")
    temporary.write_text(json.dumps(result), encoding="utf-8")
    os.replace(temporary, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
