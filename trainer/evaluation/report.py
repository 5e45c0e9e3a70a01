"""Plain-text result tables laid out like the paper's Tables 2 and 3, and the JSON record behind them.

Every table takes ``results``: method name -> the dict :func:`trainer.evaluation.metrics.evaluate_embeddings`
returns, e.g. ``{"MedFinder (ours)": ..., "untrained baseline": ...}``. A chance row is added from the
numbers themselves, so a reader never has to work out what a random ranking would score at this N.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_export.atomic_files import write_text_atomic
from trainer.evaluation.metrics import MEAN_KEY

CHANCE_ROW = "chance"
MISSING = "-"


def _fmt(value: Any, digits: int) -> str:
    """Fixed decimals, so that equal precision lines up; a missing value shows as ``-``."""
    if value is None:
        return MISSING
    return f"{float(value):.{digits}f}"


def _render(
    title: Sequence[str],
    groups: Sequence[tuple[str, int]],
    columns: Sequence[str],
    rows: Sequence[tuple[str, Sequence[str]]],
    notes: Sequence[str] = (),
) -> str:
    """Align a table: a method column, then column groups (name, width in columns) separated by ``|``."""
    name_width = max([len("Method")] + [len(name) for name, _ in rows])
    widths = [max([len(col)] + [len(cells[c]) for _, cells in rows]) for c, col in enumerate(columns)]
    # Widen a group's last column when its title is longer than its columns together.
    start = 0
    for group, span in groups:
        inner = sum(widths[start : start + span]) + 2 * (span - 1)
        if len(group) > inner:
            widths[start + span - 1] += len(group) - inner
        start += span

    def line(first: str, cells: Sequence[str], centre: bool = False) -> str:
        parts: list[str] = []
        start = 0
        for _, span in groups:
            chunk = "  ".join(cell.rjust(widths[start + i]) for i, cell in enumerate(cells[start : start + span]))
            parts.append(chunk)
            start += span
        return f"{first.ljust(name_width)} | " + " | ".join(parts)

    group_cells: list[str] = []
    start = 0
    for group, span in groups:
        inner = sum(widths[start : start + span]) + 2 * (span - 1)
        group_cells.append(group.center(inner))
        start += span
    group_line = f"{'':{name_width}} | " + " | ".join(group_cells)
    header = line("Method", list(columns))
    rule = "-" * len(header)
    body = [line(name, list(cells)) for name, cells in rows]
    return "\n".join([*title, group_line.rstrip(), header, rule, *body, *notes]) + "\n"


def _clipped_note(k_effective: Mapping[str, int] | None, n_gallery: int) -> list[str]:
    """A note for each K larger than the gallery: there P@K is computed at K = gallery size."""
    if not k_effective:
        return []
    clipped = [f"{key} uses K = {k_eff}" for key, k_eff in k_effective.items() if int(key[2:]) != k_eff]
    return [f"K above the gallery size {n_gallery} is clipped: " + ", ".join(clipped)] if clipped else []


def _common_n(results: Mapping[str, Mapping[str, Any]], key: str | None = None) -> int:
    """The one gallery size of all methods: full-gallery numbers at different N are not comparable."""
    sizes = {int(entry["N"]) for entry in results.values() if key is None or key in entry}
    if len(sizes) != 1:
        raise ValueError(f"all methods must be evaluated on the same gallery, got N = {sorted(sizes)}")
    return sizes.pop()


def _recall_ks(entry: Mapping[str, Any]) -> list[str]:
    """The R@K columns in the order the metrics produced them."""
    return [key for key in entry if key.startswith("R@")]


def format_retrieval_table(results: Mapping[str, Mapping[str, Any]], pessimistic: bool = False) -> str:
    """Table 2: rows = methods (+ chance), groups Text→Image and Image→Text, each R@K..., MdR, MnR.

    ``pessimistic=True`` shows the tie-pessimistic ranks instead; either way a note lists methods whose
    ranks have ties, because then the two conventions give different numbers.
    """
    if not results:
        raise ValueError("no results to tabulate")
    n = _common_n(results)
    first = next(iter(results.values()))
    recall_cols = _recall_ks(first["t2i"])
    metric_cols = [*recall_cols, "MdR", "MnR"]

    def cells(direction: Mapping[str, Any]) -> list[str]:
        source = direction["pessimistic"] if pessimistic and "pessimistic" in direction else direction
        return [_fmt(source.get(c), 2) for c in recall_cols] + [_fmt(source.get(c), 2) for c in ("MdR", "MnR")]

    rows: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    for method, entry in results.items():
        rows.append((method, cells(entry["t2i"]) + cells(entry["i2t"])))
        tied = {d: int(entry[d].get("n_tied_queries", 0)) for d in ("t2i", "i2t")}
        if any(tied.values()):
            other = "optimistic" if pessimistic else "pessimistic"
            alt = {d: entry[d] if pessimistic else entry[d]["pessimistic"] for d in ("t2i", "i2t")}
            notes.append(
                f"ties: {method} has {tied['t2i']} tied text→image and {tied['i2t']} tied image→text queries; "
                f"{other} R@{recall_cols[0][2:]} = {_fmt(alt['t2i'][recall_cols[0]], 2)} / "
                f"{_fmt(alt['i2t'][recall_cols[0]], 2)}, "
                f"MnR = {_fmt(alt['t2i']['MnR'], 2)} / {_fmt(alt['i2t']['MnR'], 2)}"
            )
    if CHANCE_ROW not in results:
        rows.append((CHANCE_ROW, cells(first["t2i"]["chance"]) + cells(first["i2t"]["chance"])))
    convention = "pessimistic" if pessimistic else "optimistic"
    title = [f"Text-image retrieval, N = {n} (full gallery); R@K in %, ranks {convention} on ties"]
    groups = [("Text→Image", len(metric_cols)), ("Image→Text", len(metric_cols))]
    return _render(title, groups, metric_cols * 2, rows, notes)


def format_keyword_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Table 3: rows = methods (+ chance = prevalence, + ideal), a P@K group per keyword and the mean.

    Methods without keyword results are skipped; the ideal row (all positives first) shows where a keyword
    has fewer positives than K, because then no model can reach P@K = 1.
    """
    with_keywords = {m: e for m, e in results.items() if "keyword" in e}
    if not with_keywords:
        raise ValueError("no method has keyword results")
    n = _common_n(with_keywords, "keyword")
    keywords: list[str] = []
    for entry in with_keywords.values():
        keywords += [k for k in entry["keyword"] if k != MEAN_KEY and k not in keywords]
    groups_keys = keywords + [MEAN_KEY]
    first_entry = next(iter(with_keywords.values()))["keyword"]
    p_cols = [key for key in first_entry[MEAN_KEY] if key.startswith("P@")]

    def reference(keyword: str) -> Mapping[str, Any] | None:
        for entry in with_keywords.values():
            if keyword in entry["keyword"]:
                return entry["keyword"][keyword]
        return None

    rows: list[tuple[str, list[str]]] = []
    for method, entry in with_keywords.items():
        cells: list[str] = []
        for keyword in groups_keys:
            found = entry["keyword"].get(keyword)
            cells += [_fmt(found.get(c) if found else None, 3) for c in p_cols]
        rows.append((method, cells))
    chance_cells: list[str] = []
    ideal_cells: list[str] = []
    for keyword in groups_keys:
        ref = reference(keyword)
        chance_cells += [_fmt(ref["prevalence"] if ref else None, 3)] * len(p_cols)
        ideal_cells += [_fmt(ref["ideal"].get(c) if ref and "ideal" in ref else None, 3) for c in p_cols]
    rows.append((f"{CHANCE_ROW} (prevalence)", chance_cells))
    rows.append(("ideal ranking", ideal_cells))
    positives = ", ".join(f"{k} {reference(k)['positives']}" for k in keywords)  # type: ignore[index]
    mean_ref = reference(MEAN_KEY) or {}
    notes = [
        f"positives in the gallery: {positives}",
        f"mean over the {mean_ref.get('n_keywords', len(keywords))} keywords with at least one positive",
        *_clipped_note(mean_ref.get("K_effective"), n),
    ]
    title = [f"Keyword retrieval, N = {n} (full gallery); P@K as a fraction, ground truth from labels"]
    groups = [(keyword, len(p_cols)) for keyword in groups_keys]
    return _render(title, groups, p_cols * len(groups_keys), rows, notes)


def format_image_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Image→image P@K: rows = methods (+ chance); the query is excluded from its own gallery."""
    with_i2i = {m: e for m, e in results.items() if "i2i" in e}
    if not with_i2i:
        raise ValueError("no method has image-to-image results")
    n = _common_n(with_i2i, "i2i")
    first = next(iter(with_i2i.values()))["i2i"]
    p_cols = [key for key in first if key.startswith("P@")]
    rows = [(method, [_fmt(entry["i2i"].get(c), 3) for c in p_cols]) for method, entry in with_i2i.items()]
    rows.append((CHANCE_ROW, [_fmt(first["chance"].get(c), 3) for c in p_cols]))
    title = [
        f"Image-to-image retrieval, N = {n}: each volume queries the other {n - 1}; P@K as a fraction",
    ]
    notes = [
        "relevant = shares at least one label with the query (a study without labels: the other unlabelled ones); "
        f"queries without any relevant volume: {first.get('n_queries_without_relevant', 0)}",
        *_clipped_note(first.get("K_effective"), n - 1),
    ]
    return _render(title, [("Image→Image", len(p_cols))], p_cols, rows, notes)


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, tuples/sets to lists, non-finite floats to null."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (set, frozenset)):
        return [_plain(item) for item in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as strict JSON (sorted keys, indent 2), atomically so a reader never sees half a file."""
    text = json.dumps(_plain(payload), sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)
