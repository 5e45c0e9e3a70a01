"""Radiology-style report text for synthetic studies, written from the inserted findings only.

Why so much variation: the text tower is frozen, so retrieval quality depends on the image tower
learning to match *meanings*, not one fixed sentence per label. Each present finding is phrased with
random templates and synonyms (nodule / nodular opacity / mass / spiculated lesion, effusion / pleural
fluid, adenopathy...), with its laterality, zone and size; some absent findings are stated as negatives
("No pleural effusion.", "without evidence of consolidation"), and a pool of normal filler statements
pads reports to a random target length of ~30-180 words, so a 100-word window sampler sometimes cuts.

Every sentence is kept with a structured record (:class:`Sentence`: section, kind, findings) so tests
can check that positives match the labels and negatives never mention a labelled finding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .synthetic_findings import FINDINGS, FindingSummary


NEGATIVE_PROBABILITY = 0.7  # chance that an absent finding is offered as a negative sentence
NEGATIVE_PAIR_PROBABILITY = 0.3  # chance to use a combined negative ("No consolidation or pleural effusion.")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a report and what it asserts."""

    section: str  # "header" / "findings" / "impression"
    kind: str  # "positive" / "negative" / "filler" / "header" / "normal"
    findings: tuple[str, ...]  # labels the sentence is about (empty for filler/header)
    text: str


@dataclass(frozen=True)
class Report:
    """The final text and its sentence-level record."""

    text: str
    sentences: tuple[Sentence, ...]

    @property
    def n_words(self) -> int:
        """Whitespace word count (what a word-window sampler sees)."""
        return len(self.text.split())


def _choice(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    """Uniform pick; a helper so every template draw reads the same."""
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    """Capitalise the first letter only (keeps 'CT' and the like intact)."""
    return text[:1].upper() + text[1:]


def _size(mm: float, rng: np.random.Generator) -> str:
    """A size as radiologists write it: mm for small things, cm (one decimal) for large, sometimes 2D."""
    if mm >= 30.0 or (mm >= 15.0 and rng.random() < 0.4):
        text = f"{mm / 10.0:.1f} cm"
    else:
        text = f"{int(round(mm))} mm"
    if rng.random() < 0.25:
        second = mm * rng.uniform(0.7, 0.95)
        text = (f"{mm / 10.0:.1f} x {second / 10.0:.1f} cm" if text.endswith("cm")
                else f"{int(round(mm))} x {int(round(second))} mm")
    return text


def _where(s: FindingSummary, rng: np.random.Generator) -> str:
    """Location words from laterality and zone ('right upper lobe', 'both lung bases', ...)."""
    if s.laterality == "bilateral":
        options = {
            "upper": ["both upper lobes", "bilateral upper lobes", "the upper zones bilaterally", "both lung apices"],
            "lower": ["both lower lobes", "bilateral lower lobes", "the lung bases bilaterally", "both lung bases"],
        }
    else:
        side = s.laterality
        options = {
            "upper": [f"{side} upper lobe", f"{side} upper zone", f"{side} lung apex", f"apical {side} upper lobe"],
            "lower": [f"{side} lower lobe", f"{side} lung base", f"{side} lower zone", f"basal {side} lower lobe"],
        }
    return _choice(rng, options[s.zone])


def _the(where: str) -> str:
    """'the right upper lobe' but 'both upper lobes' / 'the upper zones bilaterally' unchanged."""
    return where if where.startswith(("both", "the ")) else f"the {where}"


def _modifier(s: FindingSummary, rng: np.random.Generator) -> str:
    """Location used as a modifier before a noun: 'right lower lobe', 'bilateral upper lobe'."""
    if s.laterality == "bilateral":
        return _choice(rng, [f"bilateral {s.zone} lobe", "bibasilar" if s.zone == "lower" else "biapical"])
    return _choice(rng, [f"{s.laterality} {s.zone} lobe", f"{s.laterality} {'basilar' if s.zone == 'lower' else 'apical'}"])


def _count_word(n: int) -> str:
    """Small counts in words."""
    return {1: "one", 2: "two", 3: "three", 4: "four"}.get(n, str(n))


# ----------------------------------------------------------------------------- positives


def _nodule(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Nodule / multiple nodules / mass wording (size, location, spiculation). Returns (FINDINGS sentence, IMPRESSION sentence)."""
    where, size = _the(_where(s, rng)), _size(s.size_mm, rng)
    spic = "spiculated " if s.attrs.get("spiculated") else _choice(rng, ["", "", "well-circumscribed ", "lobulated ", "solid "])
    if s.attrs.get("mass") and s.count == 1:
        body = _choice(rng, [
            f"There is a {size} {spic}soft tissue mass in {where}.",
            f"A {spic}mass measuring {size} is present in {where}.",
            f"Large {spic}pulmonary mass in {where}, measuring {size}.",
        ])
        imp = _choice(rng, [
            _cap(f"{spic}mass in {where}, suspicious for malignancy."),
            f"{size} {'spiculated lesion' if spic.strip() == 'spiculated' else 'lung mass'} in {where}; tissue sampling recommended.",
            f"Pulmonary mass, {where}.",
        ])
    elif s.count > 1:
        body = _choice(rng, [
            f"{_cap(_count_word(s.count))} pulmonary nodules are seen, the largest in {where} measuring {size}.",
            f"Multiple {spic}nodules involving {where}, the dominant one measuring {size}.",
            f"There are {_count_word(s.count)} noncalcified nodular opacities, up to {size} in {where}.",
        ])
        imp = _choice(rng, [
            "Multiple pulmonary nodules; follow-up CT recommended.",
            f"Pulmonary nodules, largest {size} in {where}.",
            "Several nodular opacities, indeterminate.",
        ])
    else:
        body = _choice(rng, [
            f"There is a {size} {spic}nodule in {where}.",
            f"A {spic}pulmonary nodule measuring {size} is noted in {where}.",
            f"{_cap(where)} contains a {size} {spic}nodular opacity.",
            f"Noncalcified {spic}nodule in {where}, {size}.",
        ])
        imp = _choice(rng, [
            f"{size} pulmonary nodule in {where}; recommend follow-up CT.",
            f"Indeterminate nodular opacity in {where}.",
            f"{'Spiculated lesion' if spic.strip() == 'spiculated' else 'Solitary pulmonary nodule'} in {where}.",
        ])
    return body, imp


def _consolidation(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Consolidation / airspace opacity wording, air bronchograms when inserted. Returns (FINDINGS sentence, IMPRESSION sentence)."""
    where, size = _the(_where(s, rng)), _size(s.size_mm, rng)
    bronch = _choice(rng, [" with air bronchograms", " containing air bronchograms"]) if s.attrs.get("air_bronchograms") else ""
    pattern = _choice(rng, ["Dense", "Lobar", "Segmental", "Confluent", "Extensive"])
    body = _choice(rng, [
        f"{pattern} consolidation in {where}{bronch}.",
        f"There is airspace consolidation involving {where}{bronch}, measuring approximately {size}.",
        f"{pattern} airspace opacity in {where}{bronch}, consistent with consolidation.",
        f"Consolidative opacity occupies much of {where}{bronch}.",
    ])
    imp = _choice(rng, [
        f"Consolidation in {where}, likely pneumonia in the appropriate clinical setting.",
        f"Airspace disease in {where}.",
        f"{_cap(_modifier(s, rng))} consolidation.",
        "Pneumonic consolidation; recommend clinical correlation and follow-up.",
    ])
    return body, imp


def _effusion(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Effusion / pleural fluid wording with severity and side (or both sides). Returns (FINDINGS sentence, IMPRESSION sentence)."""
    severity = str(s.attrs.get("severity", "small"))
    if s.laterality == "bilateral":
        larger = s.attrs.get("larger_side")
        extra = f", {larger} greater than {'left' if larger == 'right' else 'right'}" if larger and rng.random() < 0.5 else ""
        body = _choice(rng, [
            f"{_cap(severity)} bilateral pleural effusions{extra}.",
            f"There are bilateral dependent pleural effusions{extra}.",
            f"Layering pleural fluid is present on both sides{extra}.",
        ])
        imp = _choice(rng, ["Bilateral pleural effusions.", f"{_cap(severity)} bilateral pleural fluid.",
                            "Bilateral effusions, possibly related to fluid overload."])
    else:
        side = s.laterality
        body = _choice(rng, [
            f"{_cap(severity)} {side} pleural effusion.",
            f"There is a {severity} {side}-sided pleural effusion layering dependently.",
            f"{_cap(severity)} amount of {side} pleural fluid with adjacent compressive change.",
            f"A {severity} dependent pleural effusion is seen on the {side}.",
        ])
        imp = _choice(rng, [f"{_cap(severity)} {side} pleural effusion.", f"{_cap(side)} pleural fluid.",
                            f"{_cap(side)}-sided effusion."])
    return body, imp


def _atelectasis(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Lobar collapse (with volume loss) or plate-like atelectasis wording. Returns (FINDINGS sentence, IMPRESSION sentence)."""
    where = _the(_where(s, rng))
    if s.attrs.get("kind") == "collapse":
        bilateral = s.laterality == "bilateral"
        the_lobe = f"both {s.zone} lobes" if bilateral else f"the {s.laterality} {s.zone} lobe"
        lifted = bool(s.attrs.get("volume_loss_mm"))
        diaphragm = (" and elevation of the hemidiaphragms" if bilateral else
                     f" and elevation of the {s.laterality} hemidiaphragm") if lifted else ""
        body = _choice(rng, [
            f"Partial collapse of {the_lobe} with volume loss{diaphragm}.",
            f"Dense opacity against the mediastinum in {where} with volume loss{diaphragm}, consistent with lobar atelectasis.",
            f"{_cap(the_lobe)} {'are' if bilateral else 'is'} partially collapsed{diaphragm}.",
        ])
        imp = _choice(rng, [f"Collapse of {the_lobe}.", f"Lobar atelectasis, {where}.", f"Atelectasis in {where}.",
                            f"{_cap(_modifier(s, rng))} collapse with volume loss."])
        return body, imp
    kind = _choice(rng, ["Linear", "Plate-like", "Band-like", "Discoid"])
    body = _choice(rng, [
        f"{kind} atelectasis in {where}.",
        f"{kind} opacity in {where}, compatible with atelectasis.",
        f"There is {kind.lower()} atelectasis along the fissure in {where}.",
    ])
    imp = _choice(rng, [f"Atelectasis in {where}.", f"{_cap(_modifier(s, rng))} atelectasis.",
                        "Subsegmental atelectasis, no lobar collapse.", f"Minor atelectatic change, {where}."])
    return body, imp


def _nodes(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Lymphadenopathy / enlarged nodes / adenopathy wording with nodal stations. Returns (FINDINGS sentence, IMPRESSION sentence)."""
    size = _size(s.size_mm, rng)
    stations = list(s.attrs.get("stations", []))
    place = " and ".join(stations) if stations else "mediastinal"
    if s.count > 1:
        body = _choice(rng, [
            f"Enlarged {place} lymph nodes, the largest measuring {size} in short axis.",
            f"Multiple enlarged mediastinal and hilar lymph nodes, up to {size}.",
            f"{_cap(place)} lymphadenopathy with nodes measuring up to {size}.",
        ])
    else:
        body = _choice(rng, [
            f"An enlarged {place} lymph node measures {size} in short axis.",
            f"Enlarged {place} node, {size}.",
            f"{_cap(place)} adenopathy measuring {size}.",
        ])
    imp = _choice(rng, ["Mediastinal lymphadenopathy.", "Enlarged mediastinal lymph nodes.",
                        f"{_cap(place)} adenopathy, nonspecific; consider follow-up.",
                        "Thoracic lymphadenopathy, reactive versus neoplastic."])
    return body, imp


def _emphysema(s: FindingSummary, rng: np.random.Generator) -> tuple[str, str]:
    """Emphysema wording: type from the predominant zone, severity, bullae. Returns (FINDINGS sentence, IMPRESSION sentence)."""
    severity = str(s.attrs.get("severity", "mild"))
    upper = s.zone == "upper"
    kind = _choice(rng, ["centrilobular", "centrilobular", "paraseptal"]) if upper else "panlobular"
    pred = "upper lobe predominant" if upper else "lower lobe predominant"
    where = _the(_where(s, rng))
    bullae = _choice(rng, [" with bullae", " and scattered bullae"]) if s.attrs.get("bullae") else ""
    body = _choice(rng, [
        f"{_cap(severity)} {kind} emphysema, {pred}{bullae}.",
        f"Emphysematous changes in {where}{bullae}.",
        f"Areas of low attenuation without walls in {where}, consistent with {kind} emphysema{bullae}.",
        f"There is {severity} {kind} emphysema{bullae}, most pronounced in {where}.",
    ])
    imp = _choice(rng, [f"{_cap(kind)} emphysema.", "Emphysema.", f"Emphysematous changes, {pred}.",
                        f"{_cap(severity)} emphysema."])
    return body, imp


_POSITIVE = {
    "nodule": _nodule,
    "consolidation": _consolidation,
    "pleural effusion": _effusion,
    "atelectasis": _atelectasis,
    "lymphadenopathy": _nodes,
    "emphysema": _emphysema,
}

# ----------------------------------------------------------------------------- negatives and filler

_NEGATIVE: dict[str, tuple[str, ...]] = {
    "nodule": ("No suspicious pulmonary nodules.", "No pulmonary nodule or mass.", "No focal nodular opacity is identified.",
               "There is no pulmonary mass.", "No nodules are seen."),
    "consolidation": ("No focal consolidation.", "No airspace consolidation.", "The lungs are without evidence of consolidation.",
                      "There is no consolidation."),
    "pleural effusion": ("No pleural effusion.", "No pleural effusion or pneumothorax.", "There is no pleural fluid.",
                         "Pleural spaces are clear without effusion."),
    "atelectasis": ("No atelectasis.", "No significant atelectasis.", "There is no lobar collapse or atelectasis."),
    "lymphadenopathy": ("No mediastinal or hilar lymphadenopathy.", "No enlarged lymph nodes.",
                        "No thoracic adenopathy by size criteria.", "Mediastinal and hilar nodes are not enlarged."),
    "emphysema": ("No emphysema.", "No emphysematous changes.", "Lung parenchyma without emphysema."),
}
_NEGATIVE_PAIRS: dict[tuple[str, str], tuple[str, ...]] = {
    ("consolidation", "pleural effusion"): ("No focal consolidation or pleural effusion.",
                                            "Without evidence of consolidation or pleural effusion."),
    ("nodule", "consolidation"): ("No consolidation or suspicious nodule.", "No focal consolidation, nodule or mass."),
    ("atelectasis", "consolidation"): ("No consolidation or atelectasis.",),
    ("emphysema", "nodule"): ("No emphysema or pulmonary nodules.",),
}
_FILLER: dict[str, tuple[str, ...]] = {
    "airways": ("The central airways are patent.", "Trachea and main bronchi are patent.", "No endobronchial lesion."),
    "heart": ("Heart size is normal.", "The heart is normal in size. No pericardial effusion.",
              "Cardiac size within normal limits.", "Normal heart size without pericardial thickening."),
    "aorta": ("The thoracic aorta is normal in caliber.", "Mild atherosclerotic calcification of the thoracic aorta.",
              "No aortic aneurysm."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
    "esophagus": ("The esophagus is unremarkable.",),
    "thyroid": ("The visualized thyroid gland is unremarkable.",),
    "chest wall": ("The chest wall soft tissues are unremarkable.", "No chest wall abnormality."),
    "bones": ("No acute osseous abnormality.", "Mild degenerative changes of the thoracic spine.",
              "No suspicious lytic or blastic osseous lesions.", "Bones are intact."),
    "abdomen": ("Limited images of the upper abdomen are unremarkable.", "The visualized upper abdomen is within normal limits.",
                "Imaged portions of the liver and spleen are unremarkable."),
}
# the order sentences appear in FINDINGS (lungs, pleura, mediastinum, heart, then the rest)
_TOPIC_ORDER = ("airways", "nodule", "consolidation", "atelectasis", "emphysema", "pleural effusion", "pneumothorax",
                "lymphadenopathy", "heart", "aorta", "esophagus", "thyroid", "chest wall", "bones", "abdomen")
_HEADER = (
    ("EXAMINATION: CT chest without contrast.", "EXAMINATION: CT of the chest.", "EXAM: Chest CT, non-contrast."),
    ("CLINICAL HISTORY: Cough.", "CLINICAL HISTORY: Shortness of breath.", "INDICATION: Chest pain.",
     "INDICATION: Fever.", "CLINICAL HISTORY: Weight loss.", "INDICATION: Routine follow-up."),
    ("TECHNIQUE: Axial images of the chest were acquired and reviewed in lung and soft tissue windows.",
     "TECHNIQUE: Helical CT of the chest with multiplanar reformats."),
    ("COMPARISON: None.", "COMPARISON: No prior studies available."),
)
_NORMAL_IMPRESSION = ("No acute cardiopulmonary abnormality.", "No acute intrathoracic process.", "Normal CT of the chest.",
                      "Unremarkable chest CT.")


def compose_report(summaries: list[FindingSummary], rng: np.random.Generator) -> Report:
    """Write FINDINGS and IMPRESSION for the given present findings (absent ones may appear negated).

    A target length is drawn first (30-180 words); required sentences (positives, impression) always go
    in, then negatives, filler and header lines are added in random order while they fit, so reports
    of one label set still differ widely in length and content.
    """
    target = int(rng.integers(30, 181))
    present = {s.finding for s in summaries}
    positives: list[tuple[str, Sentence]] = []
    impression: list[Sentence] = []
    for s in summaries:
        body, imp = _POSITIVE[s.finding](s, rng)
        positives.append((s.finding, Sentence("findings", "positive", (s.finding,), body)))
        impression.append(Sentence("impression", "positive", (s.finding,), imp))
    if not impression:
        impression.append(Sentence("impression", "normal", (), _choice(rng, _NORMAL_IMPRESSION)))
    rng.shuffle(impression)  # type: ignore[arg-type]

    # optional material, as (topic, sentence) candidates
    optional: list[tuple[str, Sentence]] = []
    absent = [f for f in FINDINGS if f not in present]
    used_pairs: set[str] = set()
    for pair, texts in _NEGATIVE_PAIRS.items():
        if all(f in absent for f in pair) and rng.random() < NEGATIVE_PAIR_PROBABILITY and not used_pairs & set(pair):
            used_pairs.update(pair)
            optional.append((pair[0], Sentence("findings", "negative", pair, _choice(rng, texts))))
    for finding in absent:
        if finding not in used_pairs and rng.random() < NEGATIVE_PROBABILITY:
            optional.append((finding, Sentence("findings", "negative", (finding,), _choice(rng, _NEGATIVE[finding]))))
    for topic, texts in _FILLER.items():
        if topic == "pneumothorax" and any(s.text.startswith("No pleural effusion or pneumothorax") for _, s in optional):
            continue
        optional.append((topic, Sentence("findings", "filler", (), _choice(rng, texts))))
    headers = [Sentence("header", "header", (), _choice(rng, options)) for options in _HEADER]
    pool: list[tuple[str, Sentence]] = optional + [("header", h) for h in headers]
    order = rng.permutation(len(pool))

    chosen: list[tuple[str, Sentence]] = []
    words = sum(len(s.text.split()) for _, s in positives) + sum(len(s.text.split()) for s in impression) + 2
    for idx in order:
        topic, sentence = pool[int(idx)]
        n = len(sentence.text.split())
        if words + n <= target or words < 30:
            chosen.append((topic, sentence))
            words += n
    header_part = [s for t, s in chosen if t == "header"]
    header_part.sort(key=lambda s: [i for i, opts in enumerate(_HEADER) if s.text in opts][0])
    body = positives + [(t, s) for t, s in chosen if t != "header"]
    body.sort(key=lambda ts: _TOPIC_ORDER.index(ts[0]))
    if not body:
        body = [("heart", Sentence("findings", "filler", (), "The lungs are clear."))] if not present else body

    numbered = len(impression) > 1 and rng.random() < 0.5
    imp_text = " ".join(f"{n}. {s.text}" if numbered else s.text for n, s in enumerate(impression, start=1))
    lines = [s.text for s in header_part]
    lines.append("FINDINGS: " + " ".join(s.text for _, s in body))
    lines.append("IMPRESSION: " + imp_text)
    sentences = tuple(header_part) + tuple(s for _, s in body) + tuple(impression)
    return Report(text="\n".join(lines), sentences=sentences)
