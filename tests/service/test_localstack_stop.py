"""`make run` (scripts/localstack.py run) stops everything it started, however it is stopped, and a second run
does not trip over what a first one left behind.

Each test starts the real local stack (redis-server, SeaweedFS, an interactive and a bulk Celery worker,
gunicorn) in a process group of its own, as a shell or make would. Its processes are found independently of the
guard's own bookkeeping: every descendant of the `run` process in /proc, plus redis (which daemonizes away from
the tree) by its pid file.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import localstack  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")


def _start(var: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDSEG_")}
    env["COVIDSEG_WORKER_CONCURRENCY"] = "1"
    out = open(log, "wb")
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "localstack.py"), "run", "--port", "0",
                             "--var", str(var)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    return proc


def _wait_running(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "covidseg is running" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"run exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    pytest.fail("the local stack did not come up")


def _parents() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                out[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                continue
    return out


def _tree(root: int, var: Path) -> set[int]:
    """The run's processes: descendants of `root` (the reaper excluded: it is meant to outlive it) + redis."""
    parents = _parents()
    found, frontier = set(), {root}
    while frontier:
        found |= frontier
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
    found |= {int((var / "redis" / "redis.pid").read_text())}
    return {p for p in found if "reap --var" not in _cmdline(p)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pids) -> list[int]:
    return sorted(p for p in pids if localstack._pid_alive(p))


def _gone(pids: set[int], var: Path, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pids) and not localstack.stack_processes(var):
            return []
        time.sleep(0.5)
    return sorted(set(_alive(pids)) | set(localstack.stack_processes(var)))


def _describe(pids) -> str:
    return "\n".join(f"{pid}: {_cmdline(pid)[:120]}" for pid in pids)


def test_sigterm_then_sigkill_of_its_process_group_leaves_nothing(tmp_path):
    var = tmp_path / "var"
    proc = _start(var, tmp_path / "run.log")
    try:
        _wait_running(proc, tmp_path / "run.log")
        started = _tree(proc.pid, var)
        # run, redis, weed, 2 Celery masters + their pool processes, the gunicorn master + its workers
        assert len(started) >= 8, _describe(started)
        assert set(localstack.stack_processes(var)) >= started - {proc.pid}
        # what a supervisor does to a job: SIGTERM to the group, a short wait, then SIGKILL
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(1.0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        left = _gone(started, var)
        assert left == [], "still running:\n" + _describe(left)
    finally:
        localstack.stop_stack(var)


def test_a_killed_run_and_its_reaper_are_cleaned_up_by_the_next_run(tmp_path):
    var = tmp_path / "var"
    first = _start(var, tmp_path / "first.log")
    second = None
    try:
        _wait_running(first, tmp_path / "first.log")
        started = _tree(first.pid, var)
        # the worst case: the supervisor and its reaper both die by SIGKILL, so the services stay up
        for pid in _pids_of_reaper(var):
            os.kill(pid, signal.SIGKILL)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        assert len(_alive(started)) >= 7, "the services should have been left running"
        # a second run of the same folder must come up (no port or pid-file trouble) and say what it stopped
        second = _start(var, tmp_path / "second.log")
        _wait_running(second, tmp_path / "second.log")
        assert _alive(started) == [], "leftovers of the first run: " + _describe(_alive(started))
        started = _tree(second.pid, var)
        assert "leftover process(es) of an earlier run" in (tmp_path / "second.log").read_text()
        # while it runs, a third one is refused with a clear message, not a traceback
        third = subprocess.run([sys.executable, str(REPO / "scripts" / "localstack.py"), "run", "--var", str(var)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)
        assert third.returncode == 2 and "already running" in third.stderr and "Traceback" not in third.stderr
        # a worker that dies (Celery can, on a broker reconnect) is started again, and stopped with the rest
        celery_masters = [p for p in started if " celery " in _cmdline(p) and localstack._pid_alive(p)
                          and _parents().get(p) == second.pid]
        assert celery_masters, _describe(started)
        os.kill(celery_masters[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "starting it again" not in (tmp_path / "second.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "starting it again" in (tmp_path / "second.log").read_text()
        time.sleep(2)
        started |= _tree(second.pid, var)
        # Ctrl-C (SIGINT to the group): the orderly path
        os.killpg(second.pid, signal.SIGINT)
        second.wait(90)
        left = _gone(started, var)
        assert left == [], "still running:\n" + _describe(left)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        localstack.stop_stack(var)


def _pids_of_reaper(var: Path) -> list[int]:
    want = f"reap --var {var.resolve()}"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if want in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except OSError:
                continue
    assert found, "no reaper process"
    return found
