"""Body regions: what a study shows, and whether a bundle was made for it (domain routing).

A bundle's manifest may declare its ``domain`` (modalities and body regions, :class:`~model_export.bundle_manifest.
DomainSpec`); the node then embeds only studies of those regions, because a model embeds anything it is given:
a head CT fed to a chest model lands as close to a lung study as two different lung patients do, and would be
returned as a "similar case". A study's region is read, in this order, from the first field that names one:

1. ``BodyPartExamined`` (the DICOM code, e.g. ``CHEST``, ``HEADNECK``, ``CHESTABDPELVIS``; run-together codes are
   split on the region words they contain);
2. ``SeriesDescription``, 3. ``ProtocolName`` (series level: they describe the very series that is embedded);
4. ``StudyDescription``.

A field may name several regions ("CT chest/abdomen/pelvis" -> CHEST, ABDOMEN, PELVIS); a study matches a bundle
when one of its regions is one of the bundle's (a chest-abdomen-pelvis CT contains the chest). No field naming a
region -> the region is unknown, and ``selection.unknown_region`` decides (embed, the default, or skip).

Synonyms (:data:`SYNONYMS`; matched case- and accent-insensitively on whole words of the text, with CamelCase and
punctuation split, so "AThoraxRoutine" reads "a thorax routine"; a trailing ``*`` matches any word starting so;
multi-word phrases are matched first and hide their words from shorter synonyms, so "thoracic spine" is SPINE,
not CHEST). English first, then cheap German/French/Spanish/Portuguese/Italian equivalents:

- HEAD: head, brain, skull, cranial/cranium/cranio*, intracranial, cerebr*, neurocran*, orbit(s), sinus(es),
  face, facial, temporal bone, cct; kopf, schädel, hirn/gehirn; tête, crâne, cerveau; cabeza, cráneo, cerebro;
  cabeça, crânio; testa, cranio, encefalo.
- NECK: neck, cervical (not "cervical spine"), thyroid, larynx, pharynx, soft tissue neck; hals; cou; cuello;
  pescoço; collo.
- CHEST: chest, thorax, thorac*, lung(s), pulmo*, pulmonary, ctpa, hrct, mediastin*, pleura*; brust*, lunge(n);
  poitrine, poumon(s); tórax, pulmón, pecho; pulmão; torace, polmon*.
- HEART: heart, cardiac, cardio*, coronar*; herz*; cœur; corazón; coração; cuore.
- ABDOMEN: abdomen, abdominal, abd, liver, hepat*, pancrea*, kidney(s), renal, adrenal, spleen, stomach, gastr*,
  colon, colonography, bowel, entero*, urogra*; bauch, leber, niere(n); abdom*, foie, rein(s); abdome, hígado,
  riñón; fígado, rim; addome, fegato, rene.
- PELVIS: pelvis, pelvic, bladder, prostat*, hip(s), sacrum, sacral; becken, hüfte; bassin; pelve; bacino.
- SPINE: spine, spinal, vertebr*, cspine/tspine/lspine, c-spine/t-spine/l-spine, cervical/thoracic/lumbar spine,
  thoracolumbar*, lumbar, lws/bws/hws; wirbelsäule; rachis, colonne; columna; coluna; colonna.
- UPPER_LIMB: arm, shoulder, humerus, elbow, forearm, wrist, hand, finger(s); schulter; épaule; hombro; ombro;
  spalla.  LOWER_LIMB: leg, femur, knee, tibia, ankle, foot, feet, toe(s); knie; genou; rodilla; joelho; ginocchio.
- Combined: cap, tap (chest-abdomen-pelvis), abdomen-pelvis codes; WHOLE_BODY: whole body, wholebody, total body,
  ganzkörper, corps entier, cuerpo entero, skull base to thigh. A whole-body CT matches only a bundle that lists
  WHOLE_BODY (its field of view is not a chest CT's).
- Unknown on purpose: body, partialbody, other, ``5mm``-style technical descriptions.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

HEAD, NECK, CHEST, HEART, ABDOMEN, PELVIS, SPINE = "HEAD", "NECK", "CHEST", "HEART", "ABDOMEN", "PELVIS", "SPINE"
UPPER_LIMB, LOWER_LIMB, WHOLE_BODY = "UPPER_LIMB", "LOWER_LIMB", "WHOLE_BODY"
REGIONS: tuple[str, ...] = (HEAD, NECK, CHEST, HEART, ABDOMEN, PELVIS, SPINE, UPPER_LIMB, LOWER_LIMB, WHOLE_BODY)

#: Region -> synonyms (see the module docstring for the matching rules).
SYNONYMS: dict[str, tuple[str, ...]] = {
    HEAD: ("head", "brain*", "skull", "skulls", "cranial", "cranium", "cranio*", "intracranial", "cerebr*",
           "neurocran*", "orbit", "orbits", "sinus", "sinuses", "face", "facial", "temporal bone", "cct",
           "kopf", "schadel*", "hirn", "gehirn", "tete", "crane", "cerveau", "cabeza", "craneo", "cerebro",
           "cabeca", "testa", "encefalo"),
    NECK: ("neck", "cervical", "thyroid", "larynx", "pharynx", "hals", "cou", "cuello", "pescoco", "collo"),
    CHEST: ("chest", "thorax", "thorac*", "lung", "lungs", "pulmo*", "ctpa", "hrct", "mediastin*", "pleura*",
            "brust*", "lunge", "lungen", "poitrine", "poumon", "poumons", "torax", "pulmon", "pecho", "pulmao",
            "torace", "polmon*"),
    HEART: ("heart", "cardiac", "cardio*", "coronar*", "herz*", "coeur", "corazon", "coracao", "cuore"),
    ABDOMEN: ("abdomen", "abdominal", "abd", "abdom*", "liver", "hepat*", "pancrea*", "kidney", "kidneys", "renal",
              "adrenal", "spleen", "stomach", "gastr*", "colon", "colonography", "bowel", "entero*", "urogra*",
              "bauch", "leber", "niere", "nieren", "foie", "rein", "reins", "abdome", "higado", "rinon", "figado",
              "rim", "addome", "fegato", "rene"),
    PELVIS: ("pelvis", "pelvic", "bladder", "prostat*", "hip", "hips", "sacrum", "sacral", "becken", "hufte",
             "bassin", "pelve", "bacino"),
    SPINE: ("spine", "spinal", "vertebr*", "cspine", "tspine", "lspine", "c spine", "t spine", "l spine",
            "cervical spine", "thoracic spine", "lumbar spine", "thoracolumbar*", "lumbar", "lws", "bws", "hws", "wirbelsaule",
            "rachis", "colonne", "columna", "coluna", "colonna"),
    UPPER_LIMB: ("arm", "arms", "shoulder", "shoulders", "humerus", "elbow", "forearm", "wrist", "hand", "hands",
                 "finger", "fingers", "schulter", "epaule", "hombro", "ombro", "spalla"),
    LOWER_LIMB: ("leg", "legs", "femur", "knee", "knees", "tibia", "ankle", "foot", "feet", "toe", "toes", "knie",
                 "genou", "rodilla", "joelho", "ginocchio"),
    WHOLE_BODY: ("whole body", "wholebody", "total body", "ganzkorper", "corps entier", "cuerpo entero",
                 "skull base to thigh"),
}

#: Phrases naming several regions at once.
COMBINED: dict[str, tuple[str, ...]] = {
    "cap": (CHEST, ABDOMEN, PELVIS),
    "tap": (CHEST, ABDOMEN, PELVIS),
    "chest abdomen pelvis": (CHEST, ABDOMEN, PELVIS),
    "abdomen pelvis": (ABDOMEN, PELVIS),
    "abdpelvis": (ABDOMEN, PELVIS),
    "headneck": (HEAD, NECK),
    "head neck": (HEAD, NECK),
}

#: Word stems looked for inside a run-together BodyPartExamined code ("CHESTABDPELVIS"), longest first.
CODE_STEMS: dict[str, tuple[str, ...]] = {
    "wholebody": (WHOLE_BODY,), "cspine": (SPINE,), "tspine": (SPINE,), "lspine": (SPINE,), "spine": (SPINE,),
    "chest": (CHEST,), "thorax": (CHEST,), "lung": (CHEST,), "abdomen": (ABDOMEN,), "abd": (ABDOMEN,),
    "pelvis": (PELVIS,), "head": (HEAD,), "brain": (HEAD,), "skull": (HEAD,), "neck": (NECK,), "heart": (HEART,),
}

#: Header fields read for the region, in order (the first that names one wins).
REGION_FIELDS = ("BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription")

UnknownRegion = Literal["embed", "skip"]


def _normalise(text: str) -> str:
    """Lower case, accents stripped, CamelCase and punctuation split into single-space-separated words."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).replace("ß", "ss")
    text = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text)  # AThoraxRoutine -> A Thorax Routine
    text = re.sub(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])", " ", text)  # CT2 -> CT 2
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _pattern(synonym: str) -> re.Pattern[str]:
    words = _normalise(synonym.rstrip("*"))
    tail = r"[0-9a-z]*" if synonym.endswith("*") else ""
    return re.compile(rf"(?<![0-9a-z]){re.escape(words)}{tail}(?![0-9a-z])")


def _build() -> list[tuple[re.Pattern[str], tuple[str, ...]]]:
    entries: list[tuple[str, tuple[str, ...]]] = [(s, (r,)) for r, words in SYNONYMS.items() for s in words]
    entries += list(COMBINED.items())
    # Longer phrases first: "thoracic spine" must claim its words before "thorac*" sees them.
    entries.sort(key=lambda item: (-len(_normalise(item[0].rstrip("*")).split()), -len(item[0])))
    return [(_pattern(s), regions) for s, regions in entries]


_MATCHERS = _build()


def regions_in_text(text: str | None) -> tuple[str, ...]:
    """The regions a free text (a description, a protocol name) names, in :data:`REGIONS` order; () if none."""
    remaining = f" {_normalise(str(text or ''))} "
    found: set[str] = set()
    for pattern, regions in _MATCHERS:
        if pattern.search(remaining):
            found.update(regions)
            remaining = pattern.sub(" ", remaining)
    return tuple(r for r in REGIONS if r in found)


def regions_in_body_part(code: str | None) -> tuple[str, ...]:
    """The regions of a BodyPartExamined value: its words ("CHEST_ABDOMEN") and the region stems a run-together
    code contains ("CHESTABDPELVIS"); () for codes that name none (BODY, PARTIALBODY, OTHER)."""
    if not code:
        return ()
    squashed = re.sub(r"[^a-z]", "", _normalise(code))
    found: set[str] = set(regions_in_text(code))
    for stem in sorted(CODE_STEMS, key=len, reverse=True):
        if stem in squashed:
            found.update(CODE_STEMS[stem])
            squashed = squashed.replace(stem, " ")
    return tuple(r for r in REGIONS if r in found)


@dataclass(frozen=True)
class RegionFinding:
    """The regions a study's header names and the field that named them (``source`` None: unknown)."""

    regions: tuple[str, ...] = ()
    source: str | None = None

    @property
    def known(self) -> bool:
        return bool(self.regions)

    def describe(self) -> str:
        return f"{'/'.join(self.regions)} ({self.source})" if self.known else "unknown"


def find_region(header: Mapping[str, Any] | Any) -> RegionFinding:
    """The study's regions from the first of :data:`REGION_FIELDS` that names one (``header`` has ``.get``,
    e.g. a pydicom Dataset or a dict of keyword -> value)."""
    for keyword in REGION_FIELDS:
        value = header.get(keyword)
        if value in (None, ""):
            continue
        text = str(value)
        regions = regions_in_body_part(text) if keyword == "BodyPartExamined" else regions_in_text(text)
        if regions:
            return RegionFinding(regions, keyword)
    return RegionFinding()


def check_region_names(names: Iterable[str]) -> tuple[str, ...]:
    """Upper-cased region names, each one of :data:`REGIONS` (ValueError naming the unknown one otherwise)."""
    out = []
    for name in names:
        region = str(name).strip().upper().replace(" ", "_").replace("-", "_")
        if region not in REGIONS:
            raise ValueError(f"unknown body region {name!r}; expected one of {', '.join(REGIONS)}")
        out.append(region)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class BundleDomain:
    """What the active bundle was made for, and what to do with a study of unknown region."""

    label: str  # the bundle's name (or id), for reasons
    modalities: tuple[str, ...] = ("CT",)
    body_regions: tuple[str, ...] = ()  # empty: any region
    unknown_region: UnknownRegion = "embed"


@dataclass(frozen=True)
class DomainVerdict:
    """Whether one series may be embedded by the bundle, one sentence why, and the region found."""

    matches: bool
    reason: str
    finding: RegionFinding = field(default_factory=RegionFinding)

    def as_dict(self) -> dict[str, Any]:
        return {"regions": list(self.finding.regions), "source": self.finding.source, "matches": self.matches,
                "reason": self.reason}


def judge_domain(domain: BundleDomain, modality: str, header: Mapping[str, Any] | Any) -> DomainVerdict:
    """A series (its modality, its header fields) against the bundle's domain."""
    if domain.modalities and modality not in domain.modalities:
        return DomainVerdict(False, f"modality {modality or '(none)'} is not one the bundle '{domain.label}' was made "
                                    f"for ({'/'.join(domain.modalities)})")
    finding = find_region(header)
    if not domain.body_regions:
        return DomainVerdict(True, f"body region {finding.describe()}; the bundle '{domain.label}' takes any region",
                             finding)
    wanted = "/".join(domain.body_regions)
    if not finding.known:
        fields = ", ".join(REGION_FIELDS[:-1]) + f" or {REGION_FIELDS[-1]}"
        why = f"body region unknown (no {fields} names one)"
        if domain.unknown_region == "skip":
            return DomainVerdict(False, f"{why}; the bundle '{domain.label}' was made for {wanted} and "
                                        "selection.unknown_region is skip", finding)
        return DomainVerdict(True, f"{why}: embedded by selection.unknown_region embed", finding)
    if set(finding.regions) & set(domain.body_regions):
        return DomainVerdict(True, f"body region {finding.describe()} matches the bundle's {wanted}", finding)
    return DomainVerdict(False, f"body region {finding.describe()} is not one the bundle '{domain.label}' was made "
                                f"for ({wanted})", finding)


def bundle_domain(manifest: Any, unknown_region: UnknownRegion = "embed") -> BundleDomain | None:
    """The domain a :class:`~model_export.bundle_manifest.BundleManifest` declares; None without one (bundles
    made before domains: no check)."""
    spec = getattr(manifest, "domain", None)
    if spec is None:
        return None
    return BundleDomain(label=str(manifest.model.name or manifest.bundle_id), modalities=tuple(str(m).upper() for m in spec.modalities),
                        body_regions=check_region_names(spec.body_regions), unknown_region=unknown_region)


def domain_for_export(body_regions: Sequence[str], modalities: Sequence[str] = ("CT",)) -> dict[str, list[str]]:
    """The manifest's ``domain`` entry written by exporters (names checked)."""
    return {"modalities": [str(m).upper() for m in modalities], "body_regions": list(check_region_names(body_regions))}
