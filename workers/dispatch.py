"""How the node hands an :class:`~workers.handoff.EmbedRequest` to ``embed_study``: threads in-process, or
Celery through Redis.

Both dispatchers only *notify*: the task writes its outcome where the request says and the node polls for it,
so a lost notification (a node or broker restart) costs a re-dispatch, never a study.

Priorities: a reindex (``medfinder reindex``) embeds every study again on the same workers as new arrivals, so a
request carries a priority and the thread pool takes the lowest number first: a study that just arrived waits
for the embeddings already running, never for the reindex's queue. Celery gets the same number as the message
priority (honoured where the broker transport supports priorities).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Protocol

from config import Settings
from workers.handoff import EmbedRequest

logger = logging.getLogger(__name__)


PRIORITY_ARRIVAL = 0  # a study that arrived: first
PRIORITY_REINDEX = 10  # re-embedding for another collection: when no arrival waits


class Dispatcher(Protocol):
    def submit(self, request: EmbedRequest, priority: int = PRIORITY_ARRIVAL) -> None: ...

    def close(self) -> None: ...


class ThreadDispatcher:
    """Embedded mode: ``embed_study`` on a small pool of threads inside the node (no server of any kind), lowest
    priority number first, first come first served within a priority."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.PriorityQueue[tuple[int, int, EmbedRequest | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"embed-{n}", daemon=True)
                         for n in range(settings.workers.embedded_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, request: EmbedRequest, priority: int = PRIORITY_ARRIVAL) -> None:
        self._queue.put((priority, next(self._order), request))

    def _work(self) -> None:
        from workers.embed_study import embed_study

        while True:
            _priority, _order, request = self._queue.get()
            if request is None:
                return
            try:
                embed_study(self.settings, request)
            except Exception as error:  # noqa: BLE001 - embed_study records its own failures; a bug or a full disk
                logger.error("event=embed_thread_crashed error=%r", error)

    def close(self) -> None:
        """Drop what waits (the node re-dispatches it after a restart), let running embeddings finish."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _thread in self._threads:
            self._queue.put((-1, next(self._order), None))
        for thread in self._threads:
            thread.join()


class CeleryDispatcher:
    """Distributed mode: one message per study version on the GPU queue (Redis broker)."""

    def __init__(self, settings: Settings) -> None:
        from workers.celery import EMBED_TASK, make_celery

        self.settings = settings
        self._task = EMBED_TASK
        self._app = make_celery(settings)

    def submit(self, request: EmbedRequest, priority: int = PRIORITY_ARRIVAL) -> None:
        self._app.send_task(self._task, args=[request.model_dump(mode="json")], queue=self.settings.workers.queue,
                            priority=priority)

    def close(self) -> None:
        self._app.close()


def make_dispatcher(settings: Settings) -> Dispatcher:
    return CeleryDispatcher(settings) if settings.workers.mode == "distributed" else ThreadDispatcher(settings)
