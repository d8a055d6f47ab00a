"""A plain Celery app, as a promptq user has one: it imports Celery and nothing of promptq.

Its tasks run on a second, plain Celery worker (``PlainCeleryWorker``: a subprocess on its own
queue); they report whether their process had imported promptq's worker, which it must not.
The broker and result backend are PLAIN_CELERY_URL (the tests' redis-server).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from celery import Celery

USER_QUEUE = "user"  # the plain worker's queue: the callbacks of the tests' canvases
PROMPTQ_QUEUE = "promptq"  # promptq's queue, by its documented name


def plain_app(url: str) -> Celery:
    """A Celery app on ``url`` (broker and result backend), JSON only, with the user's tasks."""
    app = Celery("plain", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=USER_QUEUE,
        broker_connection_retry_on_startup=True,
    )

    @app.task(name="user.shout", shared=False)  # type: ignore[untyped-decorator]  # Celery
    def shout(answer: dict[str, Any]) -> dict[str, Any]:
        """A chain's next step: the promptq answer, upper-cased."""
        return {"shouted": str(answer["content"]).upper(), "promptq_loaded": _promptq_loaded()}

    @app.task(name="user.summarise", shared=False)  # type: ignore[untyped-decorator]  # Celery
    def summarise(answers: list[dict[str, Any]]) -> dict[str, Any]:
        """A chord's body: how many answers came, and their contents."""
        contents = sorted(str(a["content"]) for a in answers)
        return {"count": len(answers), "contents": contents, "promptq_loaded": _promptq_loaded()}

    return app


def _promptq_loaded() -> bool:
    return any(name.split(".")[0] == "worker" for name in sys.modules)


# The app `celery -A tests.support.plain_celery:app worker` runs.
app = plain_app(os.environ.get("PLAIN_CELERY_URL", "redis://127.0.0.1:1/0"))


class PlainCeleryWorker:
    """``celery worker`` on USER_QUEUE for ``app`` above, a subprocess logging to a file."""

    def __init__(self, url: str, log_path: Path) -> None:
        self.url = url
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PlainCeleryWorker:
        env = {**os.environ, "PLAIN_CELERY_URL": self.url}
        command = [sys.executable, "-m", "celery", "-A", f"{__name__}:app", "worker"]
        options = ["-Q", USER_QUEUE, "-P", "solo", "-n", "plain@%h", "--without-mingle"]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [*command, *options, "--without-gossip", "-l", "INFO"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while " ready." not in self.log():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"the plain Celery worker did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
