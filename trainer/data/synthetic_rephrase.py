"""A second report for a synthetic study: the same findings, worded anew by an independent random stream.

Why: the hybrid evaluation needs, for each held-out study, a "prior report" that says what the study shows
but not in the words of the query text; otherwise report-only retrieval would be string matching. The
benchmark's own reports stay untouched: they come from ``generate_case``'s text stream
(``default_rng([seed, split_code, index]).spawn(4)[2]``), while a rewording comes from
``default_rng([seed, split_code, index, REPHRASE_STREAM, variant])``, a different seed sequence, so nothing
the generator writes changes and the rewording is still deterministic.

The findings are rebuilt from the lesions recorded in ``benchmark.json`` (no volume is regenerated). Sizes
there are rounded to 0.1 mm, so a rewording can differ from what the exact sizes would give by one digit;
:func:`reproduce_report` (the original stream over the rebuilt findings) measures how faithful the rebuild
is: it gives back the benchmark's own report for nearly every study, and for every one up to a size's last
digit (:attr:`StudyText.reproduced_up_to_sizes`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .synthetic import SPLIT_CODES
from .synthetic_findings import FindingSummary, Lesion, summarise
from .synthetic_reports import Report, compose_report

# Fourth entry of the rewording's seed sequence: any constant works, it only has to be fixed forever.
REPHRASE_STREAM = 0x5EC0
_LESION_FIELDS = {f.name for f in dataclasses.fields(Lesion)}
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class StudyText:
    """One study's benchmark report beside a rewording of the same findings."""

    volume_id: str
    labels: tuple[str, ...]
    original: str  # the benchmark's report (what text→image evaluation queries with)
    original_positives: tuple[str, ...]  # its sentences that state a present finding
    alternate: Report  # the rewording
    reproduced: bool  # the original stream over the rebuilt findings gave back ``original`` exactly
    reproduced_up_to_sizes: bool  # ... or with only numbers (sizes rounded to 0.1 mm in the record) differing

    @property
    def identical(self) -> bool:
        return self.alternate.text == self.original

    @property
    def alternate_positives(self) -> tuple[str, ...]:
        return tuple(s.text for s in self.alternate.sentences if s.kind == "positive")

    @property
    def alternate_findings(self) -> frozenset[str]:
        """The findings the rewording states as present (must equal ``labels``)."""
        return frozenset(f for s in self.alternate.sentences if s.kind == "positive" for f in s.findings)


def record_findings(record: Mapping[str, Any]) -> list[FindingSummary]:
    """The finding summaries of one ``benchmark.json`` volume record, rebuilt from its lesion records."""
    lesions = []
    for item in record["lesions"]:
        fields = {key: value for key, value in item.items() if key in _LESION_FIELDS}
        fields["centre_vox"] = tuple(fields["centre_vox"])
        lesions.append(Lesion(**fields))
    return summarise(lesions)


def _original_stream(seed: int, record: Mapping[str, Any]) -> np.random.Generator:
    """The text stream ``generate_case`` used for this study (third child of its root generator)."""
    root = np.random.default_rng([int(seed), SPLIT_CODES[record["split"]], int(record["index"])])
    return root.spawn(4)[2]


def rephrase_stream(seed: int, record: Mapping[str, Any], variant: int = 1) -> np.random.Generator:
    """The rewording's own stream: independent of every stream the generator uses."""
    if variant < 1:
        raise ValueError(f"variant must be >= 1 (0 would be the benchmark's own wording), got {variant}")
    return np.random.default_rng(
        [int(seed), SPLIT_CODES[record["split"]], int(record["index"]), REPHRASE_STREAM, int(variant)]
    )


def reproduce_report(seed: int, record: Mapping[str, Any]) -> Report:
    """The benchmark's report written again from the rebuilt findings (a check of the rebuild)."""
    return compose_report(record_findings(record), _original_stream(seed, record))


def rephrase_report(seed: int, record: Mapping[str, Any], variant: int = 1) -> Report:
    """A report of the same findings in other words (``variant`` 1, 2, ... give different ones)."""
    return compose_report(record_findings(record), rephrase_stream(seed, record, variant))


def study_texts(benchmark: Mapping[str, Any], studies: list[tuple[str, str]], variant: int = 1) -> list[StudyText]:
    """Each ``(volume_id, report text)`` (the manifest's report) with its rewording, from a parsed benchmark.json."""
    seed = int(benchmark["seed"])
    volumes = benchmark["volumes"]
    missing = [vid for vid, _text in studies if vid not in volumes]
    if missing:
        raise KeyError(f"{len(missing)} volume(s) are not in benchmark.json, e.g. {missing[0]!r}")
    out: list[StudyText] = []
    for vid, original in studies:
        record = volumes[vid]
        sentences = record["report_sentences"]  # [section, kind, findings, text] per sentence
        again = reproduce_report(seed, record).text
        out.append(StudyText(
            volume_id=vid,
            labels=tuple(record["labels"]),
            original=original,
            original_positives=tuple(text for _section, kind, _findings, text in sentences if kind == "positive"),
            alternate=rephrase_report(seed, record, variant),
            reproduced=again == original,
            reproduced_up_to_sizes=_NUMBER.sub("#", again) == _NUMBER.sub("#", original),
        ))
    return out
