"""The Celery application of distributed mode: ``celery -A workers worker -Q gpu -c 1``.

Settings come from ``$MEDFINDER_CONFIG`` (a YAML file or preset name) and ``MEDFINDER__…`` variables, exactly
as for ``medfinder serve``; workers must see the node's data folder (``paths.data_dir``) at the same path.

Choices for long GPU tasks (field notes §9): one reserved task per process (``worker_prefetch_multiplier=1``),
acknowledged only when done (``task_acks_late``) and re-queued if the process dies
(``task_reject_on_worker_lost``); a Redis visibility timeout above the longest task so nothing is redelivered
while it still runs; the ONNX session is created per worker process (``worker_process_init``), never in the
parent, so prefork, CUDA and time limits all work. Results are not stored in Celery: the outcome file in the
spool is the result.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from config import Settings, load_settings

logger = logging.getLogger(__name__)

EMBED_TASK = "medfinder.embed_study"
CONFIG_ENV = "MEDFINDER_CONFIG"


def worker_settings() -> Settings:
    """The settings a worker process runs with (``$MEDFINDER_CONFIG`` + environment)."""
    return load_settings(os.environ.get(CONFIG_ENV) or None)


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from ``settings.workers`` (also used by the node to send tasks)."""
    workers = settings.workers
    app = Celery("medfinder", broker=workers.broker_url, backend=workers.result_backend)
    app.conf.update(
        task_default_queue=workers.queue,
        task_routes={EMBED_TASK: {"queue": workers.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_time_limit=workers.task_time_limit_s,
        task_soft_time_limit=max(1, workers.task_time_limit_s - 30),
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": workers.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


app = make_celery(worker_settings())


@app.task(name=EMBED_TASK)
def embed_study_task(request: dict[str, Any]) -> str:
    """Celery face of :func:`workers.embed_study.embed_study` (the same code as embedded mode).

    ``request``: an :class:`~workers.handoff.EmbedRequest` as JSON (Celery messages carry JSON only).
    """
    from workers.embed_study import embed_study
    from workers.handoff import EmbedRequest

    return embed_study(worker_settings(), EmbedRequest.model_validate(request)).value


@worker_process_init.connect
def _load_active_bundle(**_: Any) -> None:
    """Create the ONNX sessions in each worker process, before its first task, never in the parent."""
    from model_export.registry import active_bundle_id
    from workers.embed_study import bundle_for

    settings = worker_settings()
    bundle_id = active_bundle_id(settings)
    if bundle_id is None:
        logger.warning("event=worker_no_active_bundle data_dir=%s", settings.paths.data_dir)
        return
    bundle = bundle_for(settings, bundle_id)
    if settings.workers.providers and "CUDAExecutionProvider" in settings.workers.providers \
            and "CUDAExecutionProvider" not in bundle.providers["image_encoder"]:
        raise RuntimeError("a GPU was requested (workers.providers) but ONNX Runtime runs on "
                           f"{bundle.providers['image_encoder']}: check CUDA/cuDNN and onnxruntime-gpu")
