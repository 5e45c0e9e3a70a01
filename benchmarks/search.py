"""Search at scale: the edge index (qdrant-edge in this process) answering study -> similar-study queries.

For each size in ``--sizes`` a fresh index is built in a temporary folder with the node's own index class
(:class:`workers.index.edge.EdgeIndex`, one ``upsert`` per study as the node writes them), HNSW is built with
``optimize()`` (in place, blocking: the figure is the build's own cost), and ``--queries`` queries are timed:

* vectors: embedding-like: ``--clusters`` cluster centres (themselves grouped around 30 broader directions), each
  study a noisy copy of one centre, unit norm, ``--dim`` dimensions; a patient's second study lies next to its
  first (so excluding the own patient matters);
* payloads: modality (correlated with the cluster), body part, sex, age band, institution, study date;
* a query = a stored study's own vector, filters: its own study and its own patient excluded, same modality;
* ``hnsw``: the configured search (ef ``--ef``; with int8, rescoring with ``--oversampling``); ``exact``:
  ``SearchParams(exact=True)`` on the same index, ignoring quantisation (the reference), timed on its own;
* recall@10: the share of the exact top-10 the HNSW search returns, averaged over the queries.

Sizes from ``--int8-from`` on (default 1,000,000) use int8 scalar quantisation of ``image`` with the originals on
disk (``vectors_on_disk``); smaller sizes keep float32 vectors in memory. RAM per study is reported three ways,
each stated in the table: RSS growth of this process over insert + build; the RSS of a fresh process that loads
the built index and answers the queries (serving), per study; and the engine's own files per study by kind
(quantised vectors, pinned in RAM; original vectors, in RAM or on disk; HNSW graph).

Rows are dicts; ``print_rows`` prints every table. The interface rows (text query end to end, REST round trip,
C-FIND round trip: :mod:`benchmarks.search_interfaces`) run the node's own code over the same index through
``ROW_HOOKS``; each hook gets the built index of one size.

    python -m benchmarks search [--sizes 100000 1000000] [--queries 200] [--json out.json]
    python -m benchmarks search --sizes 20000          # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]

MODALITIES = ("CT", "MR", "CR")
BODY_PARTS = ("CHEST", "ABDOMEN", "HEAD", "PELVIS")
SEXES = ("M", "F", "O")
AGE_BANDS = tuple(f"{lo}-{lo + 9}" for lo in range(0, 90, 10)) + ("90+",)
INSTITUTIONS = ("North", "South", "East", "West", "Central")
BUNDLE = "bench-bundle"


@dataclass
class Corpus:
    """The studies of one size: unit vectors and their payload columns."""

    vectors: np.ndarray  # (n, dim) float32, unit norm
    patient: np.ndarray  # patient index per study
    modality: np.ndarray  # indexes into MODALITIES
    body_part: np.ndarray
    sex: np.ndarray
    age_band: np.ndarray
    institution: np.ndarray
    study_day: np.ndarray  # YYYYMMDD integers

    def __len__(self) -> int:
        return len(self.vectors)

    def study_uid(self, i: int) -> str:
        return f"1.2.826.0.1.3680043.10.543.{i}"

    def patient_pseudonym(self, i: int) -> str:
        return f"{int(self.patient[i]):032x}"

    def payload(self, i: int) -> dict[str, Any]:
        day = int(self.study_day[i])
        return {"study_uid": self.study_uid(i), "series_uid": f"{self.study_uid(i)}.1", "accession": f"A{i}",
                "study_date": str(day), "modality": MODALITIES[self.modality[i]],
                "body_part": BODY_PARTS[self.body_part[i]], "study_description": None, "series_description": None,
                "institution": INSTITUTIONS[self.institution[i]], "patient_pseudonym": self.patient_pseudonym(i),
                "sex": SEXES[self.sex[i]], "age_band": AGE_BANDS[self.age_band[i]], "study_day": day,
                "has_report": False, "bundle_id": BUNDLE, "result_version": 1, "n_slices": 300}


def make_corpus(n: int, dim: int, clusters: int, seed: int = 0, noise: float = 0.8) -> Corpus:
    """Clustered unit vectors (a cluster: cosine ~0.6 between its members) with realistic payload columns."""
    rng = np.random.default_rng(seed)
    broad = rng.normal(size=(30, dim))
    broad /= np.linalg.norm(broad, axis=1, keepdims=True)
    centres = broad[rng.integers(0, 30, clusters)] + 0.9 * rng.normal(size=(clusters, dim)) / np.sqrt(dim)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cluster = rng.integers(0, clusters, n)
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 50_000):  # in chunks: float64 scratch for 1M x 512 would need 4 GB
        stop = min(n, start + 50_000)
        chunk = centres[cluster[start:stop]] + noise * rng.normal(size=(stop - start, dim)) / np.sqrt(dim)
        vectors[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    # Every third study is a patient's second one: a small step from the first.
    patient = np.arange(n)
    second = np.arange(1, n, 3)
    patient[second] = second - 1
    step = vectors[second - 1] + 0.3 * rng.normal(size=(len(second), dim)).astype(np.float32) / np.sqrt(dim)
    vectors[second] = step / np.linalg.norm(step, axis=1, keepdims=True)
    cluster[second] = cluster[second - 1]
    preferred = rng.choice(len(MODALITIES), size=clusters, p=[0.7, 0.2, 0.1])
    modality = np.where(rng.random(n) < 0.8, preferred[cluster], rng.integers(0, len(MODALITIES), n))
    days = rng.integers(0, 16 * 365, n)
    dates = np.datetime64("2010-01-01") + days.astype("timedelta64[D]")
    study_day = np.array([int(str(d).replace("-", "")) for d in dates.astype(str)], dtype=np.int64)
    return Corpus(vectors=vectors, patient=patient, modality=modality,
                  body_part=rng.choice(len(BODY_PARTS), size=n, p=[0.4, 0.25, 0.2, 0.15]),
                  sex=rng.choice(len(SEXES), size=n, p=[0.49, 0.49, 0.02]),
                  age_band=rng.integers(0, len(AGE_BANDS), n), institution=rng.integers(0, len(INSTITUTIONS), n),
                  study_day=study_day)


def rss_kb() -> dict[str, int]:
    """This process's resident memory: anonymous (heap) and file-backed (mmapped files), in KB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def engine_files(shard: Path) -> dict[str, int]:
    """Bytes of the engine's files by kind, summed over segments: quantised ``image`` vectors, original vectors
    per name (a non-appendable segment stores every named vector densely, so ``report`` costs its full size even
    for studies without a report), HNSW graphs, payload storage and indexes, the rest (WAL, id tracker)."""
    kinds = {"quantized": 0, "image": 0, "report": 0, "hnsw": 0, "payload": 0, "other": 0}
    for path in shard.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        parts = path.relative_to(shard).parts
        storage = next((part.removeprefix("vector_storage-") for part in parts
                        if part.startswith("vector_storage-")), None)
        if any(part.startswith("vector_index-") for part in parts):
            kinds["hnsw"] += size
        elif path.name.startswith("quantized"):
            kinds["quantized"] += size
        elif storage in ("image", "report") and (path.name == "matrix.dat" or path.name.startswith("chunk_")):
            kinds[storage] += size
        elif any(part.startswith("payload") for part in parts):
            kinds["payload"] += size
        else:
            kinds["other"] += size
    return kinds


@dataclass
class Query:
    vector: list[float]
    filters: Any  # SearchFilters


def make_queries(corpus: Corpus, count: int, seed: int = 1) -> list[Query]:
    from workers.index.base import SearchFilters

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(corpus), size=count, replace=False)
    return [Query(corpus.vectors[i].tolist(), SearchFilters(
        exclude_study_uid=corpus.study_uid(int(i)), exclude_patient=corpus.patient_pseudonym(int(i)),
        modality=MODALITIES[corpus.modality[i]])) for i in chosen]


def timed_search(index: Any, queries: list[Query], exact: bool) -> tuple[list[float], list[list[str]]]:
    """Milliseconds per query and the returned ids (10 per query)."""
    latencies, results = [], []
    for query in queries:
        started = time.perf_counter()
        matches = index.search(query.vector, 10, filters=query.filters, exact=exact)
        latencies.append((time.perf_counter() - started) * 1000)
        results.append([m.point_id for m in matches])
    return latencies, results


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Built:
    """One size's built index and what went into it: what a row hook gets."""

    n: int
    index: Any  # EdgeIndex, open
    corpus: Corpus
    queries: list[Query]
    settings: Any  # IndexSettings
    bundle: Path | None  # the model bundle of the interface rows (its id names the collection), or None


def interface_rows(built: Built) -> list[Row]:
    """Text query end to end, REST round trip and C-FIND round trip over this index
    (:mod:`benchmarks.search_interfaces`); none when the run has no bundle (``--no-interfaces``)."""
    if built.bundle is None:
        return []
    from benchmarks.search_interfaces import interface_rows as rows_for
    from config import load_settings

    settings = load_settings(None, overrides={"index": built.settings.model_dump(mode="json")}, environ={})
    uids = [built.corpus.study_uid(i) for i in range(0, built.n, max(1, built.n // 60))][:60]
    return rows_for(built.n, built.index, built.bundle, settings, uids)


ROW_HOOKS: list[Callable[[Built], list[Row]]] = [interface_rows]

SERVING_SCRIPT = """
import json, sys, time
import qdrant_edge as qe
def rss():
    out = {}
    for line in open('/proc/self/status'):
        key, _, value = line.partition(':')
        if key in ('VmRSS', 'RssAnon', 'RssFile'):
            out[key] = int(value.split()[0])
    return out
shard_path, queries_path, ef, oversampling = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
quantized = sys.argv[5] == '1'
queries = json.load(open(queries_path))
before = rss()
started = time.perf_counter()
shard = qe.EdgeShard.load(shard_path)
load_s = time.perf_counter() - started
loaded = rss()
quantization = qe.QuantizationSearchParams(rescore=True, oversampling=oversampling) if quantized else None
params = qe.SearchParams(hnsw_ef=ef, quantization=quantization, acorn=qe.AcornSearchParams(enable=True))
for query in queries:
    must = [qe.FieldCondition(key='modality', match=qe.MatchValue(query['modality']))]
    must_not = [qe.FieldCondition(key='study_uid', match=qe.MatchValue(query['study_uid'])),
                qe.FieldCondition(key='patient_pseudonym', match=qe.MatchValue(query['patient']))]
    shard.query(qe.QueryRequest(limit=10, query=qe.Query.Nearest(query['vector'], using='image'),
                                filter=qe.Filter(must=must, must_not=must_not), params=params, with_payload=True))
served = rss()
shard.close()
print(json.dumps({'before': before, 'loaded': loaded, 'served': served, 'load_s': load_s}))
"""


def serving_memory(shard: Path, queries: list[Query], settings: Any, work: Path) -> dict[str, dict[str, int]]:
    """RSS of a fresh process: before loading the shard, after loading it, after answering the queries."""
    path = work / "serving-queries.json"
    path.write_text(json.dumps([{"vector": q.vector, "modality": q.filters.modality,
                                 "study_uid": q.filters.exclude_study_uid, "patient": q.filters.exclude_patient}
                                for q in queries]), encoding="utf-8")
    result = subprocess.run([sys.executable, "-c", SERVING_SCRIPT, str(shard), str(path), str(settings.hnsw_ef),
                             str(settings.oversampling), "1" if settings.quantization == "int8" else "0"],
                            capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"serving process failed: {result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_size(n: int, args: argparse.Namespace, work: Path) -> tuple[list[Row], Row]:
    """Build, time and measure one size; returns its query rows and its build row."""
    from config.settings import IndexSettings
    from workers.index.base import point_id_for
    from workers.index.edge import EdgeIndex

    int8 = n >= args.int8_from
    settings = IndexSettings(hnsw_ef=args.ef[0], hnsw_m=args.m, hnsw_ef_construct=args.ef_construct,
                             quantization="int8" if int8 else "none", rescore=True, oversampling=args.oversampling,
                             vectors_on_disk=int8, optimize_after_points=0)
    print(f"[{n}] generating {n} x {args.dim} clustered vectors ...", flush=True)
    corpus = make_corpus(n, args.dim, args.clusters)
    queries = make_queries(corpus, args.queries)
    folder = work / f"index-{n}"
    index = EdgeIndex(folder, settings)
    index.ensure_collection(args.bundle_id, args.dim)
    ids = [point_id_for(corpus.study_uid(i), args.bundle_id) for i in range(n)]
    rss_before = rss_kb()
    print(f"[{n}] inserting ...", flush=True)
    started = time.perf_counter()
    for i in range(n):
        index.upsert(ids[i], {"image": corpus.vectors[i].tolist()}, corpus.payload(i))
    insert_s = time.perf_counter() - started
    rss_inserted = rss_kb()
    print(f"[{n}] inserted in {insert_s:.1f} s; building HNSW (m={args.m}, ef_construct={args.ef_construct}"
          f"{', int8' if int8 else ''}) ...", flush=True)
    started = time.perf_counter()
    index.optimize_now()
    build_s = time.perf_counter() - started
    rss_built = rss_kb()
    info = index.info()
    print(f"[{n}] HNSW built in {build_s:.1f} s ({info.indexed_vectors} vectors indexed); querying ...", flush=True)

    exact_ms, exact_ids = timed_search(index, queries, exact=True)
    rows = []
    for ef in args.ef:
        index.settings.hnsw_ef = ef
        timed_search(index, queries[:20], exact=False)  # warm-up: first touches of the graph and vectors
        hnsw_ms, hnsw_ids = timed_search(index, queries, exact=False)
        recall = statistics.mean(len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(hnsw_ids, exact_ids))
        search = f"hnsw m={args.m} ef={ef}" + (f" int8 rescore x{args.oversampling:g}" if int8 else "")
        rows.append({"studies": n, "query": "study->similar", "search": search, "p50_ms": percentile(hnsw_ms, 50),
                     "p95_ms": percentile(hnsw_ms, 95), "recall_at_10": recall, "queries": len(queries)})
    rows.append({"studies": n, "query": "study->similar", "search": "exact (reference)",
                 "p50_ms": percentile(exact_ms, 50), "p95_ms": percentile(exact_ms, 95), "recall_at_10": 1.0,
                 "queries": len(queries)})
    index.settings.hnsw_ef = args.ef[0]
    built = Built(n, index, corpus, queries, settings, args.bundle)
    for hook in ROW_HOOKS:
        rows.extend(hook(built))
    shard = index.shard_path
    index.close()

    files = engine_files(shard)
    serving = serving_memory(shard, queries, settings, work)
    shutil.rmtree(folder, ignore_errors=True)
    grown_kb = (rss_built["RssAnon"] + rss_built["RssFile"]) - (rss_before["RssAnon"] + rss_before["RssFile"])
    serving_kb = serving["served"]["VmRSS"] - serving["before"]["VmRSS"]
    build_row = {
        "studies": n, "dim": args.dim, "int8": int8, "vectors_on_disk": int8,
        "insert_per_s": n / insert_s, "insert_s": insert_s, "hnsw_build_s": build_s,
        "rss_growth_kb_per_study": grown_kb / n,
        "rss_growth_anon_kb_per_study": (rss_built["RssAnon"] - rss_before["RssAnon"]) / n,
        "rss_after_insert_kb_per_study": ((rss_inserted["RssAnon"] + rss_inserted["RssFile"])
                                          - (rss_before["RssAnon"] + rss_before["RssFile"])) / n,
        "peak_rss_gb": rss_built["VmHWM"] / 1024 / 1024,
        "load_s": serving["load_s"],
        "serving_rss_kb_per_study": serving_kb / n,
        "serving_rss_anon_kb_per_study": (serving["served"]["RssAnon"] - serving["before"]["RssAnon"]) / n,
        "serving_rss_file_kb_per_study": (serving["served"]["RssFile"] - serving["before"]["RssFile"]) / n,
        "quantized_kb_per_study": files["quantized"] / 1024 / n,
        "image_f32_kb_per_study": files["image"] / 1024 / n,
        "report_f32_kb_per_study": files["report"] / 1024 / n,
        "hnsw_kb_per_study": files["hnsw"] / 1024 / n,
        "disk_kb_per_study": sum(files.values()) / 1024 / n,
    }
    return rows, build_row


QUERY_COLUMNS = {"studies": "{}", "query": "{}", "search": "{}", "p50_ms": "{:.2f}", "p95_ms": "{:.2f}",
                 "recall_at_10": "{:.4f}", "queries": "{}"}
BUILD_COLUMNS = {"studies": "{}", "int8": "{}", "insert_per_s": "{:.0f}", "hnsw_build_s": "{:.1f}",
                 "peak_rss_gb": "{:.1f}", "load_s": "{:.2f}",
                 "rss_growth_kb_per_study": "{:.3f}", "serving_rss_kb_per_study": "{:.3f}",
                 "serving_rss_anon_kb_per_study": "{:.3f}", "quantized_kb_per_study": "{:.3f}",
                 "image_f32_kb_per_study": "{:.3f}", "report_f32_kb_per_study": "{:.3f}",
                 "hnsw_kb_per_study": "{:.3f}"}
BUILD_HEADERS = {"insert_per_s": "inserts/s", "hnsw_build_s": "HNSW build s",
                 "peak_rss_gb": "peak RSS GB", "load_s": "load s",
                 "rss_growth_kb_per_study": "RSS+",
                 "serving_rss_kb_per_study": "serve", "serving_rss_anon_kb_per_study": "serve anon",
                 "quantized_kb_per_study": "int8", "image_f32_kb_per_study": "image f32",
                 "report_f32_kb_per_study": "report f32", "hnsw_kb_per_study": "hnsw"}
BUILD_TITLE = (
    "Build, and memory per study in KB. peak RSS: this process's high-water mark (mmapped files included); load s: "
    "opening the built index (what a background build's swap holds searches for); RSS+: this process's RSS growth "
    "over insert + HNSW build; serve: RSS growth of a fresh process that loads the index and answers the queries "
    "(serve anon: its heap part, the rest is mmapped files it touched); int8, image f32, report f32, hnsw: the "
    "engine's files for the quantised image vectors (pinned in RAM), the original image vectors (cached in RAM; "
    "on disk in int8 rows), the report vectors (always on disk; stored densely, reports or not), the HNSW graph")


def print_rows(title: str, rows: list[Row], columns: dict[str, str], headers: dict[str, str] | None = None) -> None:
    """One table: the title, a header line, one line per row (a column a row lacks is left blank)."""
    headers = headers or {}
    cells = [[fmt.format(row[key]) if key in row else "" for key, fmt in columns.items()] for row in rows]
    names = [headers.get(key, key) for key in columns]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(names)]
    print(title)
    print("  ".join(name.rjust(width) for name, width in zip(names, widths)))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    from config.settings import IndexSettings

    defaults = IndexSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--ef", type=int, nargs="+", default=[defaults.hnsw_ef],
                        help="hnsw_ef at query time (several: one row each; the first is the serving figure)")
    parser.add_argument("--m", type=int, default=defaults.hnsw_m, help="hnsw_m")
    parser.add_argument("--ef-construct", type=int, default=defaults.hnsw_ef_construct)
    parser.add_argument("--oversampling", type=float, default=defaults.oversampling)
    parser.add_argument("--int8-from", type=int, default=1_000_000, help="sizes from this on use int8 + on disk")
    parser.add_argument("--work-dir", type=Path, help="where the indexes are built (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--bundle", type=Path, help="model bundle for the text / REST / C-FIND rows (its dimension "
                        "must be --dim; default: a tiny-preset bundle made for the run, MiniLM-L6 text tower)")
    parser.add_argument("--no-interfaces", action="store_true", help="index rows only (no text, REST, C-FIND rows)")
    args = parser.parse_args(argv)
    query_rows: list[Row] = []
    build_rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="medfinder-search-bench-", dir=args.work_dir) as tmp:
        args.bundle, args.bundle_id = _interface_bundle(args, Path(tmp))
        for n in args.sizes:
            rows, build_row = run_size(n, args, Path(tmp))
            query_rows.extend(rows)
            build_rows.append(build_row)
    cores = len(os.sched_getaffinity(0))
    print(f"\nSearch: edge index (qdrant-edge {_edge_version()}), {args.dim}-d clustered unit vectors, "
          f"{args.queries} study->similar queries (own study + own patient excluded, same modality), top 10, "
          f"{cores} cores")
    print_rows("Queries (latency includes the index class: filter building, payload conversion)", query_rows,
               QUERY_COLUMNS)
    print()
    print_rows(BUILD_TITLE, build_rows, BUILD_COLUMNS, BUILD_HEADERS)
    result = {"benchmark": "search", "python": sys.version.split()[0], "cores": cores, "dim": args.dim,
              "clusters": args.clusters, "queries": args.queries, "ef": args.ef, "m": args.m,
              "ef_construct": args.ef_construct, "oversampling": args.oversampling, "query_rows": query_rows,
              "build_rows": build_rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _interface_bundle(args: argparse.Namespace, work: Path) -> tuple[Path | None, str]:
    """The bundle of the interface rows and the bundle id the index is made for."""
    if args.no_interfaces:
        return None, BUNDLE
    from model_export.bundle_manifest import read_manifest
    from benchmarks.search_interfaces import prepare_bundle

    if args.bundle is None:
        print(f"making a {args.dim}-d tiny-preset bundle for the text / REST / C-FIND rows ...", flush=True)
    bundle = args.bundle or prepare_bundle(args.dim, work / "interface-bundle")
    manifest = read_manifest(bundle)
    if manifest.embedding_dim != args.dim:
        raise SystemExit(f"--bundle embeds into {manifest.embedding_dim} dimensions, the index has {args.dim}")
    return bundle, manifest.bundle_id


def _edge_version() -> str:
    from importlib.metadata import version

    return version("qdrant-edge-py")


if __name__ == "__main__":
    sys.exit(main())
