"""What a supervised process starts with, on real processes: the answer path's CPU priority
(`Supervised._prioritise`: nice and real-time round robin for every thread, a thread ending
meanwhile passed over; from exec, but once ready for a replica restarted while the others
serve), and the settings only a restart gets (`ProcessSpec.restart_env`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.supervisor.app import Supervised, SupervisorSettings, _each_thread, _threads
from services.supervisor.plan import ProcessSpec

THREADS = 4
# A tid no process has (above the kernel's pid_max default).
GONE = 4_194_305

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="raising priority needs root (or CAP_SYS_NICE)"
)


@pytest.fixture
def threaded() -> Iterator[int]:
    """A process with THREADS threads besides its main one, sleeping."""
    code = (
        "import threading, time\n"
        f"for _ in range({THREADS}): threading.Thread(target=time.sleep, args=(60,)).start()\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while len(_threads(process.pid)) < THREADS + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield process.pid
    finally:
        process.kill()
        process.wait()


def _spec(tmp_path: Path, *, replicated: bool = False) -> ProcessSpec:
    return ProcessSpec(
        name="rendezvous",
        module="services.rendezvous",
        stage=3,
        env={},
        endpoint="127.0.0.1:1",
        ready_file=tmp_path / "ready.json",
        log_file=tmp_path / "log",
        latency_critical=True,
        replicated=replicated,
    )


def test_only_a_replica_restarted_waits_until_ready(tmp_path: Path) -> None:
    settings = SupervisorSettings()
    lone, replica = (
        Supervised(_spec(tmp_path), settings),
        Supervised(_spec(tmp_path, replicated=True), settings),
    )
    assert not lone._prioritise_when_ready and not replica._prioritise_when_ready
    lone.restarts = replica.restarts = 1
    assert not lone._prioritise_when_ready
    assert replica._prioritise_when_ready


@needs_root
def test_every_thread_gets_nice_and_real_time_priority(threaded: int, tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    settings = SupervisorSettings(latency_critical_nice=-5, latency_critical_rt_priority=2)
    threads = _threads(threaded)
    assert len(threads) == THREADS + 1
    assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_OTHER}
    Supervised(spec, settings)._prioritise(threaded)
    assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_RR}
    assert {os.sched_getparam(t).sched_priority for t in threads} == {2}
    # Read from /proc: nice is field 19 of a thread's stat.
    nice = {
        int(Path(f"/proc/{threaded}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[16])
        for t in threads
    }
    assert nice == {-5}


@needs_root
def test_a_thread_that_ended_is_passed_over(threaded: int) -> None:
    applied: list[int] = []

    def renice(thread: int) -> None:
        os.setpriority(os.PRIO_PROCESS, thread, 0)
        applied.append(thread)

    threads = _threads(threaded)
    assert _each_thread([GONE, *threads], renice)
    assert applied == threads


async def test_only_a_restart_runs_with_the_restart_settings(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    spec = _spec(tmp_path)
    spec.latency_critical = False
    spec.command = [
        sys.executable,
        "-c",
        f"import os; open({str(seen)!r}, 'a').write(os.environ.get('RDV_X', '-') + ' ')",
    ]
    spec.restart_env = {"RDV_X": "rejoining"}
    # The watcher would restart it after the backoff: not within this test.
    process = Supervised(spec, SupervisorSettings(restart_backoff_initial_s=600))
    for restarts in (0, 1):
        process.restarts = restarts
        await process.start()
        assert process.process is not None
        await process.process.wait()
    await process.stop()
    assert seen.read_text().split() == ["-", "rejoining"]
