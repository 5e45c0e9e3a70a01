"""The text of a radiology report stored as a DICOM Structured Report (Basic Text, Enhanced, Comprehensive SR).

What becomes text, walking the content tree depth-first in document order:

* ``TEXT`` items: their value. ``CODE`` items: "concept: code meaning" (Enhanced/Comprehensive reports often
  code their findings, "Finding: Pleural effusion"). ``NUM`` items: "concept: value unit" ("Diameter: 12 mm",
  UCUM code value as the unit, none for the dimensionless "1").
* ``CONTAINER`` items below the root are sections: their concept name becomes a heading in front of the first
  content that follows ("Findings: ...", nested "Findings: Lungs: ..."), and each section starts a new
  paragraph. A ``TEXT`` item directly under the root uses its own concept name as its heading
  ("Impression: ..."). The root's name (the document title, the same on every report of a site) is left out.
* Left out: items related by ``HAS OBS CONTEXT``, ``HAS ACQ CONTEXT`` and ``HAS CONCEPT MOD`` (who observed,
  the subject, the language: metadata, and observer names are PHI that says nothing about the findings);
  ``PNAME``, ``DATE``, ``TIME``, ``DATETIME``, ``UIDREF`` and the reference types (``IMAGE``, ``COMPOSITE``,
  ``SCOORD``...), which carry no report wording.

Plain pydicom traversal rather than ``highdicom.sr``: highdicom's ``from_dataset`` parsers validate the IOD and
templates strictly and refuse the slightly non-conformant reports RIS systems produce, while a read-only walk of
``ContentSequence`` only needs the few attributes above and degrades item by item.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

__all__ = ["REPORT_SR_CLASSES", "report_text"]

# The storage classes a radiology report arrives in. Comprehensive 3D SR (our own similar-case result) is not one.
REPORT_SR_CLASSES = (str(BasicTextSRStorage), str(EnhancedSRStorage), str(ComprehensiveSRStorage))

_SKIPPED_RELATIONSHIPS = frozenset({"HAS OBS CONTEXT", "HAS ACQ CONTEXT", "HAS CONCEPT MOD"})
_MAX_DEPTH = 64  # a content tree deeper than this is malformed (or hostile); its deeper items are ignored


def _words(value: object) -> str:
    return " ".join(str(value or "").split())


def _number(value: object) -> str:
    """A DS value as written by people: "12.0" -> "12", "0.50" -> "0.5" (unparseable: as stored)."""
    text = _words(value)
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return _words(names[0].get("CodeMeaning", "")) if names else ""


def _labelled(label: str, value: str) -> str:
    return f"{label}: {value}" if label else value


def _item_text(item: Dataset, value_type: str) -> str:
    """The words one content item contributes (empty for types that carry none)."""
    if value_type == "TEXT":
        return _words(item.get("TextValue", ""))
    if value_type == "CODE":
        codes = item.get("ConceptCodeSequence")
        meaning = _words(codes[0].get("CodeMeaning", "")) if codes else ""
        return _labelled(_concept(item), meaning) if meaning else ""
    if value_type == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return ""
        value = _number(measured[0].get("NumericValue", ""))
        units = measured[0].get("MeasurementUnitsCodeSequence")
        unit = ""
        if units:
            code = units[0]
            unit = _words(code.get("CodeValue", "") if code.get("CodingSchemeDesignator") == "UCUM"
                          else code.get("CodeMeaning", ""))
        return _labelled(_concept(item), f"{value} {unit}".strip() if unit != "1" else value) if value else ""
    return ""


class _Writer:
    """Collects paragraphs; headings wait until content follows them, so empty sections leave nothing."""

    def __init__(self) -> None:
        self.paragraphs: list[str] = []
        self._current: list[str] = []
        self._pending: list[str] = []

    def section(self, heading: str) -> None:
        self.close()
        if heading:
            self._pending.append(heading)

    def add(self, text: str) -> None:
        if not text:
            return
        if self._pending:
            self.close()
            text = ": ".join([*self._pending, text])
            self._pending = []
        self._current.append(text)

    def close(self) -> None:
        if self._current:
            self.paragraphs.append(" ".join(self._current))
            self._current = []

    def end_section(self) -> None:
        self._pending = []
        self.close()


def _walk(items: object, writer: _Writer, depth: int) -> None:
    if depth > _MAX_DEPTH or not items:
        return
    for item in items:  # type: ignore[attr-defined]
        if not isinstance(item, Dataset):
            continue
        if _words(item.get("RelationshipType", "")).upper() in _SKIPPED_RELATIONSHIPS:
            continue
        value_type = _words(item.get("ValueType", "")).upper()
        if value_type == "CONTAINER":
            writer.section(_concept(item))
            _walk(item.get("ContentSequence"), writer, depth + 1)
            writer.end_section()
            continue
        own_heading = value_type == "TEXT" and depth == 0  # a TEXT item outside any section heads itself
        if own_heading:
            writer.section(_concept(item))
        writer.add(_item_text(item, value_type))
        _walk(item.get("ContentSequence"), writer, depth + 1)
        if own_heading:
            writer.end_section()


def report_text(dataset: Dataset) -> str:
    """The report's wording, one paragraph per section, in document order; empty when it has none."""
    writer = _Writer()
    _walk(dataset.get("ContentSequence"), writer, 0)
    writer.close()
    return "\n".join(p for p in writer.paragraphs if p)
