"""When the backfill may ask the PACS: the days of the range, the daily window and the study rate.

A PACS is a clinical system: a backfill of years must not compete with the day's reading, so it asks at most
``rate`` studies a minute and only inside a daily window (which may cross midnight, e.g. ``20:00-06:00``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as clock


def parse_day(text: str) -> date:
    """``YYYYMMDD`` (DICOM DA) -> date, with an error that names the expected form."""
    try:
        return datetime.strptime(text.strip(), "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"expected a date as YYYYMMDD, got {text!r}") from None


def days(since: date, until: date) -> Iterator[date]:
    """Every day from ``since`` to ``until`` inclusive (one C-FIND each: no PACS result limit truncates a day
    the way it would truncate a range)."""
    if until < since:
        raise ValueError(f"--until {until:%Y%m%d} is before --since {since:%Y%m%d}")
    day = since
    while day <= until:
        yield day
        day += timedelta(days=1)


@dataclass(frozen=True)
class DailyWindow:
    """``HH:MM-HH:MM`` local time; ``start == end`` means all day. A window may cross midnight."""

    start: clock
    end: clock

    @classmethod
    def parse(cls, text: str) -> DailyWindow:
        try:
            first, second = text.strip().split("-")
            start = datetime.strptime(first.strip(), "%H:%M").time()
            end = datetime.strptime(second.strip(), "%H:%M").time()
        except ValueError:
            raise ValueError(f"expected a daily window as HH:MM-HH:MM, got {text!r}") from None
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, now: datetime) -> bool:
        moment = now.time()
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # crosses midnight

    def next_opening(self, now: datetime) -> datetime:
        """The next time the window opens (``now`` when it is open)."""
        if self.is_open(now):
            return now
        opening = datetime.combine(now.date(), self.start, tzinfo=now.tzinfo)
        return opening if opening > now else opening + timedelta(days=1)


class Pacer:
    """Waits before each study so that at most ``rate_per_min`` are asked a minute and only inside ``window``;
    ``say`` gets a line whenever it waits for the window (a backfill that sleeps for hours must say so)."""

    def __init__(self, rate_per_min: float, window: DailyWindow | None, say: Callable[[str], None],
                 sleep: Callable[[float], None] = time.sleep, now: Callable[[], datetime] = datetime.now) -> None:
        self.interval = 60.0 / rate_per_min if rate_per_min > 0 else 0.0
        self.window = window
        self.say = say
        self._sleep = sleep
        self._now = now
        self._last: float | None = None

    def wait(self) -> None:
        if self.window is not None:
            now = self._now()
            opening = self.window.next_opening(now)
            if opening > now:
                seconds = (opening - now).total_seconds()
                self.say(f"outside the daily window {self.window}: waiting until {opening:%Y-%m-%d %H:%M} "
                         f"({seconds / 3600:.1f} h)")
                self._sleep(seconds)
        if self._last is not None and self.interval > 0:
            left = self._last + self.interval - time.monotonic()
            if left > 0:
                self._sleep(left)
        self._last = time.monotonic()
