"""How the node hands an :class:`~workers.handoff.EmbedRequest` to ``embed_study``: threads in-process, or
Celery through Redis.

Both dispatchers only *notify*: the task writes its outcome where the request says and the node polls for it,
so a lost notification (a node or broker restart) costs a re-dispatch, never a study.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from config import Settings
from workers.handoff import EmbedRequest

logger = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def submit(self, request: EmbedRequest) -> None: ...

    def close(self) -> None: ...


class ThreadDispatcher:
    """Embedded mode: ``embed_study`` on a small thread pool inside the node (no server of any kind)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(max_workers=settings.workers.embedded_threads, thread_name_prefix="embed")

    def submit(self, request: EmbedRequest) -> None:
        from workers.embed_study import embed_study

        future = self._pool.submit(embed_study, self.settings, request)
        future.add_done_callback(_log_crash)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _log_crash(future: Future[str]) -> None:
    error = future.exception() if not future.cancelled() else None
    if error is not None:  # embed_study records its own failures; this is a bug or a full disk
        logger.error("event=embed_thread_crashed error=%r", error)


class CeleryDispatcher:
    """Distributed mode: one message per study version on the GPU queue (Redis broker)."""

    def __init__(self, settings: Settings) -> None:
        from workers.celery import EMBED_TASK, make_celery

        self.settings = settings
        self._task = EMBED_TASK
        self._app = make_celery(settings)

    def submit(self, request: EmbedRequest) -> None:
        self._app.send_task(self._task, args=[request.model_dump(mode="json")], queue=self.settings.workers.queue)

    def close(self) -> None:
        self._app.close()


def make_dispatcher(settings: Settings) -> Dispatcher:
    return CeleryDispatcher(settings) if settings.workers.mode == "distributed" else ThreadDispatcher(settings)
