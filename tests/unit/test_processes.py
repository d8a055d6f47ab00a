"""worker.cli.supervisor: the supervisor restarts dying children, gives up on a crash loop, and
stops everything on a child's bad-setting exit; with stand-in children (small Python scripts)."""

from __future__ import annotations

import sys
from pathlib import Path

from worker.cli.supervisor import Supervisor
from worker.errors import EXIT_CRASH_LOOP, EXIT_USAGE


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# A child that runs until it is asked to stop (SIGTERM ends it).
SERVE = "import time\nwhile True: time.sleep(1)"


def test_children_that_exit_0_are_not_restarted() -> None:
    said: list[str] = []
    supervisor = Supervisor(lambda index: python("pass"), 3, say=said.append)

    assert supervisor.run() == 0
    assert sum("stopped; not restarted" in line for line in said) == 3


def test_a_crash_looping_child_stops_the_worker_with_a_clear_message(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    crash = f"open({str(starts)!r}, 'a').write('x')\nraise SystemExit(1)"
    said: list[str] = []
    supervisor = Supervisor(
        lambda index: python(crash if index == 1 else SERVE),
        2,
        say=said.append,
        restart_first_s=0.001,
        crash_limit=3,
    )

    assert supervisor.run() == EXIT_CRASH_LOOP
    assert len(starts.read_text()) == 4  # the first start and three restarts
    assert sum("exited with status 1; restarting in" in line for line in said) == 3
    assert "worker process 1" in said[-1] and "giving up, stopping the others" in said[-1]


def test_a_child_exiting_2_stops_the_others_and_the_worker_exits_2() -> None:
    said: list[str] = []
    supervisor = Supervisor(
        lambda index: python("raise SystemExit(2)" if index == 2 else SERVE), 3, say=said.append
    )

    assert supervisor.run() == EXIT_USAGE
    assert any("worker process 2" in line and "stopping the others" in line for line in said)
    assert not any("restarting" in line for line in said)


def test_a_killed_child_is_restarted(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    # Dies by SIGKILL on its first start, then exits 0 on the next.
    code = (
        "import os, signal\n"
        f"path = {str(starts)!r}\n"
        "first = not os.path.exists(path)\n"
        "open(path, 'a').write('x')\n"
        "if first: os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    said: list[str] = []
    supervisor = Supervisor(lambda index: python(code), 1, say=said.append, restart_first_s=0.001)

    assert supervisor.run() == 0
    assert len(starts.read_text()) == 2
    assert any("was killed by signal 9; restarting" in line for line in said)
