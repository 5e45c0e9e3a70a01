"""Ordinary study-level C-FIND (the node's own AE title): the studies the node holds that match every key."""

from __future__ import annotations

from collections.abc import Iterator

from dicom_node.query.identifier import Condition, StudyQuery
from dicom_node.query.matching import any_text_matches, time_in_range
from dicom_node.store.state import StateStore, StudyAttributes


def condition_matches(condition: Condition, study: StudyAttributes) -> bool:
    """One matching key against one study (PS3.4 C.2.2.2, as :mod:`dicom_node.query.matching` applies it)."""
    spec = condition.spec
    value = getattr(study, spec.field)
    if spec.kind == "uid":
        return value in condition.uids
    if spec.kind == "date":
        assert condition.range is not None
        return condition.range.contains(value)
    if spec.kind == "time":
        assert condition.range is not None
        return time_in_range(value, condition.range)
    values = value if spec.kind == "list" else ([value] if value is not None else [])
    return any_text_matches(condition.value, values, ignore_case=spec.kind == "name")


def study_matches(query: StudyQuery, study: StudyAttributes) -> bool:
    return all(condition_matches(condition, study) for condition in query.conditions)


def candidate_studies(query: StudyQuery, store: StateStore) -> list[StudyAttributes]:
    """The studies worth testing: a UID key is answered by lookups, anything else reads every study."""
    for condition in query.conditions:
        if condition.spec.kind == "uid" and condition.spec.field == "study_uid":
            found = (store.study_attributes(uid) for uid in dict.fromkeys(condition.uids))
            return [study for study in found if study is not None]
    return store.all_study_attributes()


def find_studies(query: StudyQuery, store: StateStore) -> Iterator[StudyAttributes]:
    """The matching studies, oldest arrival first (C-FIND gives pending responses no defined order)."""
    return (study for study in candidate_studies(query, store) if study_matches(query, study))
