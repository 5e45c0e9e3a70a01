"""``python -m workers``: start a Celery embedding worker (``celery -A workers worker -Q gpu -c 1``).

Extra arguments go to Celery's worker command, e.g. ``python -m workers --concurrency 2 --loglevel INFO``.
"""

import sys

from workers.celery import app

arguments = sys.argv[1:]
queue = app.conf.task_default_queue
app.worker_main(["worker", "-Q", queue, "--concurrency", "1", "--pool", "prefork", *arguments])
