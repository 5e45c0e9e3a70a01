"""C-FIND attribute matching (PS3.4 C.2.2.2) as pure functions: single value, UID list, wildcard, range, universal.

Rules this SCP applies (stated in the README's conformance facts):

* an empty value, or ``*`` alone on a text key, is universal matching (everything matches);
* ``*`` (any run of characters) and ``?`` (one character) are wildcards on text keys; text matching is
  case-sensitive except for person names (PN), which match case-insensitively;
* a UID key takes one UID or a backslash-separated list (no wildcards);
* dates match a single ``YYYYMMDD`` or a range ``A-B``, ``A-`` or ``-B`` (inclusive); times likewise on
  ``HHMMSS[.ffffff]`` prefixes, an open end filled with the earliest / latest time it can stand for;
* a multi-valued query value (backslash-separated) matches when any query value matches any stored value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

STATUS_IDENTIFIER_INVALID = 0xA900  # Identifier does not match SOP Class


class IdentifierError(ValueError):
    """A request identifier this SCP cannot answer; ``keyword`` names the offending attribute when known."""

    def __init__(self, message: str, keyword: str | None = None, status: int = STATUS_IDENTIFIER_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.keyword = keyword
        self.status = status


def is_universal(value: str) -> bool:
    """Empty, or ``*`` alone: matches everything."""
    return value.strip() in ("", "*")


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def split_values(value: str) -> list[str]:
    """A backslash-separated query value as its parts (surrounding spaces are not significant)."""
    return [part.strip() for part in value.split("\\")]


@lru_cache(maxsize=256)
def _wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = [".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern]
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def text_matches(query: str, value: str | None, *, ignore_case: bool = False) -> bool:
    """Single-value or wildcard matching of one query value against one stored value (None = absent)."""
    query = query.strip()
    if is_universal(query):
        return True
    if value is None:
        return False
    value = value.strip()
    if has_wildcard(query):
        return _wildcard_regex(query, ignore_case).fullmatch(value) is not None
    return value.casefold() == query.casefold() if ignore_case else value == query


def any_text_matches(query: str, values: tuple[str, ...] | list[str], *, ignore_case: bool = False) -> bool:
    """A (possibly multi-valued) query value against a multi-valued attribute: any pair matching."""
    if is_universal(query):
        return True
    return any(text_matches(part, value, ignore_case=ignore_case) for part in split_values(query) for value in values)


def parse_uid_list(query: str, keyword: str = "StudyInstanceUID") -> tuple[str, ...]:
    """The UIDs of a single-UID or UID-list query value; :class:`IdentifierError` on wildcards or bad UIDs."""
    if has_wildcard(query):
        raise IdentifierError(f"{keyword}: no wildcards in a UID", keyword)
    uids = tuple(part for part in split_values(query) if part)
    for uid in uids:
        if len(uid) > 64 or not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid):
            raise IdentifierError(f"{keyword}: not a UID", keyword)
    if not uids:
        raise IdentifierError(f"{keyword}: empty UID list", keyword)
    return uids


@dataclass(frozen=True)
class Range:
    """An inclusive range of comparable strings (YYYYMMDD or HHMMSS.ffffff); None = open end."""

    start: str | None
    end: str | None

    def contains(self, value: str | None) -> bool:
        if value is None:
            return False
        return (self.start is None or value >= self.start) and (self.end is None or value <= self.end)


def _check_date(text: str, keyword: str) -> str:
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise IdentifierError(f"{keyword}: not a date YYYYMMDD or date range", keyword) from None
    return text


def parse_date_range(query: str, keyword: str = "StudyDate") -> Range:
    """``A``, ``A-B``, ``A-`` or ``-B`` (YYYYMMDD) as an inclusive range; :class:`IdentifierError` otherwise."""
    query = query.strip()
    if query.count("-") > 1 or query == "-":
        raise IdentifierError(f"{keyword}: not a date YYYYMMDD or date range", keyword)
    if "-" not in query:
        day = _check_date(query, keyword)
        return Range(day, day)
    start, end = (part.strip() for part in query.split("-"))
    result = Range(_check_date(start, keyword) if start else None, _check_date(end, keyword) if end else None)
    if result.start and result.end and result.start > result.end:
        raise IdentifierError(f"{keyword}: range starts after it ends", keyword)
    return result


_TIME = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?")
_EARLIEST, _LATEST = ("00", "00"), ("59", "59")  # minutes, seconds


def normal_time(text: str, *, latest: bool = False) -> str | None:
    """``HH[MM[SS[.F]]]`` (colons tolerated) as ``HHMMSS.ffffff``, missing parts the earliest (or latest) they
    could be; None when it is not a time."""
    match = _TIME.fullmatch(text.strip().replace(":", ""))
    if match is None:
        return None
    hours, minutes, seconds, fraction = match.groups()
    fill = _LATEST if latest else _EARLIEST
    minutes, seconds = minutes or fill[0], seconds or fill[1]
    fraction = (fraction or "").ljust(6, "9" if latest else "0")
    if int(hours) > 23 or int(minutes) > 59 or int(seconds) > 60:
        return None
    return f"{hours}{minutes}{seconds}.{fraction}"


def parse_time_range(query: str, keyword: str = "StudyTime") -> Range:
    """``T``, ``T1-T2``, ``T1-`` or ``-T2`` as an inclusive range of normalised times (see :func:`normal_time`)."""
    query = query.strip()
    if query.count("-") > 1 or query == "-":
        raise IdentifierError(f"{keyword}: not a time HHMMSS or time range", keyword)
    start, end = (query.split("-") + [""])[:2] if "-" in query else (query, query)
    low = normal_time(start) if start else None
    high = normal_time(end, latest=True) if end else None
    if (start and low is None) or (end and high is None):
        raise IdentifierError(f"{keyword}: not a time HHMMSS or time range", keyword)
    return Range(low, high)


def time_in_range(value: str | None, time_range: Range) -> bool:
    """A stored time (any precision) against a range from :func:`parse_time_range`."""
    normal = normal_time(value) if value else None
    return time_range.contains(normal)
