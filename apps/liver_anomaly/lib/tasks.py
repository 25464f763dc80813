"""MONAI Label's background tasks (training, scoring), kept from holding their slot.

MONAI Label runs one task of a kind at a time, in a child process, and answers 429 "already running" to the next
request of that kind until the child exits; a child that hangs holds the slot for good. Here a run still going
after its time limit is stopped (as ``DELETE /scoring/`` would), and ``busy`` tells whether a run is queued or
running, so the app does not queue another behind it.
"""

from __future__ import annotations

import logging
import threading
import time

from monailabel.utils.async_tasks.task import AsyncTask
from monailabel.utils.async_tasks.utils import processes, tasks

logger = logging.getLogger(__name__)

SCORING_TIMEOUT_S = 600.0
CHECK_EVERY_S = 2.0


def busy(method: str) -> bool:
    return bool(processes(method)) or any(task.get("status") == "SUBMITTED" for task in tasks(method))


def stop_overdue(method: str, limit_s: float, every_s: float = CHECK_EVERY_S) -> threading.Thread:
    """Start a watcher (a daemon thread) that stops a ``method`` run once it has run ``limit_s`` seconds."""
    started: dict[str, float] = {}

    def watch():
        while True:
            now = time.monotonic()
            running = dict(processes(method))
            for task_id in list(started):
                if task_id not in running:
                    started.pop(task_id)
            for task_id in running:
                started.setdefault(task_id, now)
                if now - started[task_id] > limit_s:
                    logger.warning("%s run %s still going after %.0f s: stopped (--conf %s_timeout_s)", method, task_id, limit_s, method)
                    try:
                        AsyncTask.stop(method)
                    except Exception as exc:  # the child may have exited meanwhile
                        logger.warning("stopping %s run %s: %s", method, task_id, exc)
                    started.pop(task_id, None)
            time.sleep(every_s)

    thread = threading.Thread(target=watch, name=f"{method}-time-limit", daemon=True)
    thread.start()
    return thread
