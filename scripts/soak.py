#!/usr/bin/env python3
"""Soak test with faults (`make soak`): the real stack under sustained load while its parts are killed and
restarted, then a reconciliation of everything that was accepted against the database and the bucket.

The stack (scripts/localstack.py): PostgreSQL, Redis, SeaweedFS (S3), the API under gunicorn and the two Celery
workers (interactive + niced bulk, a pool of COVIDSEG_WORKER_CONCURRENCY processes each; backend --backend,
INT8 by default with its one-off conversion cached in --cache-dir). No rate limit, short recovery periods
(--heartbeat, --stale-after, --sweep-interval, --dispatch-grace) so that recovery happens within the run.

Load: --jobs slices from --clients concurrent clients (threads, requests), paced evenly over --duration-hint
seconds (default: jobs / 4 s, about what 2 busy cores infer): mostly single-slice POST /api/v1/jobs, about
--batch-share of the slices in batches of 5-10 files, and --studies whole studies (POST /api/v1/studies, a small
NIfTI volume made of the fixture slices). Slices are the committed tests/fixtures/slices/*.png. Every submission
carries its own Idempotency-Key and is retried with the same key on connection errors, 5xx and 429 (so a retry
never duplicates); what answered 202/200 with ids counts as accepted.

Faults (--faults, times as fractions of the duration hint or seconds with an `s` suffix):
  kill_worker   SIGKILL of one pool process of the interactive worker (a child of its Celery master, the one
                running a job when there is one); kill_bulk the same for the bulk worker
  redis         stop redis-server (no persistence: queued messages are lost), --fault-down s, start it again
  s3            the same for SeaweedFS (`weed mini`, same data directory and ports)
  postgres      the same for PostgreSQL (pg_ctl stop -m fast / start, same cluster, data directory and port)
A worker (or the API) whose main process exits is an incident: it is recorded and, as docker-compose's
`restart: unless-stopped` does in production, started again (--no-supervise: left dead). Each fault records
when it happened, how long the action took, how long /readyz (polled every 0.25 s) and
submissions (from the clients' own attempts) were unavailable, and for a worker kill the jobs the killed
process held and how long its replacement took to load the model and those jobs to finish.

Reconciliation, after the queue drained (--drain-timeout, the workers' recovery sweep running):
  * accepted = jobs (and studies) in terminal states; lost = accepted but not in the database or not terminal;
    stuck = queued/running with no activity for longer than the sweep's limit (stale_after + dispatch_grace +
    2 sweep intervals); rows that no client was ever given (a retry that created a second set of jobs);
  * the bucket, listed: every succeeded job has exactly results/<id>/{mask,probability,overlay}.png (and their
    SHA-256 metadata equals the row's), nothing else; every job has its inputs/<id>; no orphan objects (inputs/,
    results/, studies/ keys of no job or study, result objects of jobs that did not succeed); every succeeded
    study has exactly the result files its row lists under studies/<id>/results/ and its input.tar;
  * model runs: the workers run with a probe (the Celery app of shared.service.celery_app plus one log line,
    `SOAK-RUN`, naming the jobs or study and the lease of every model call); runs per job are compared with the
    claims the database counted (`attempts`): runs beyond attempts, or two runs under one lease, are duplicates.
    (Re-runs after a kill or a lease takeover are counted in attempts and reported as re-runs.)

Prints one table, writes JSON (--out/--json). Exit status 1 when the verdict lists a problem (a broken invariant,
a failed job, a worker incident). Logs are deleted unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import localstack  # noqa: E402

SLICES = sorted((REPO / "tests" / "fixtures" / "slices").glob("*.png"))
RESULT_NAMES = {"mask.png", "probability.png", "overlay.png"}
DEFAULT_FAULTS = "kill_worker@0.15,redis@0.35,s3@0.55,postgres@0.75"
FAULT_KINDS = ("kill_worker", "kill_bulk", "redis", "s3", "postgres")
WORKER_NAMES = {"interactive": "soak-interactive", "bulk": "soak-bulk"}

#: The workers' Celery app: shared.service.celery_app's, unchanged, plus one log line per model call naming the
#: jobs (or the study) and the lease it runs for. Written into the run directory, put first on PYTHONPATH.
PROBE_SOURCE = '''"""scripts/soak.py's probe: the service's Celery app, plus a `SOAK-RUN` log line per model call."""
import logging
import os
import threading

from celery import signals

from shared.service.celery_app import celery_app as app  # noqa: F401 - `celery -A covidseg_soak_probe`
import worker.study_tasks as _study_tasks
import worker.tasks as _tasks

_log = logging.getLogger("covidseg.soak")
_ctx = threading.local()
_process, _run = _tasks._process, _study_tasks._run


def _process_probe(r, jobs, lease, done, clock):
    _ctx.job = (jobs, lease, done)
    try:
        return _process(r, jobs, lease, done, clock)
    finally:
        _ctx.job = None


def _run_probe(r, study, progress):
    _ctx.study = (study.id, progress.lease)
    try:
        return _run(r, study, progress)
    finally:
        _ctx.study = None


_tasks._process = _process_probe          # looked up as globals at call time by process_jobs / process_study
_study_tasks._run = _run_probe


@signals.worker_process_init.connect
def _patch_model_calls(**_):
    """In each pool child (the main process never imports the model)."""
    import shared.core.study as study_lib
    from shared.core.inference import Segmenter

    predict, analyse = Segmenter.predict, study_lib.analyse_study

    def predict_probe(self, images, *args, **kwargs):
        job = getattr(_ctx, "job", None)
        if job is not None and getattr(_ctx, "study", None) is None:
            jobs, lease, done = job
            _log.warning("SOAK-RUN kind=job pid=%d lease=%s ids=%s", os.getpid(), lease,
                         ",".join(j.id for j in jobs if j.id not in done))
        return predict(self, images, *args, **kwargs)

    def analyse_probe(volume, segmenter, *args, **kwargs):
        study = getattr(_ctx, "study", None)
        if study is not None:
            _log.warning("SOAK-RUN kind=study pid=%d lease=%s ids=%s", os.getpid(), study[1], study[0])
        return analyse(volume, segmenter, *args, **kwargs)

    Segmenter.predict = predict_probe
    study_lib.analyse_study = analyse_probe
'''
_RUN_LINE = re.compile(r"SOAK-RUN kind=(job|study) pid=(\d+) lease=(\w+) ids=([0-9a-f,]*)")
_TIMINGS = re.compile(r"task timings: slices=(\d+)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# --- small helpers -------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep_until(self, t: float, stop: threading.Event | None = None) -> None:
        while True:
            left = t - self.now()
            if left <= 0:
                return
            if stop is not None:
                if stop.wait(min(left, 1.0)):
                    return
            else:
                time.sleep(min(left, 1.0))


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _r(x, nd=1):
    return None if x is None else round(x, nd)


def parse_faults(spec: str, duration: float) -> list[dict]:
    out = []
    for item in [s.strip() for s in (spec or "").split(",") if s.strip()]:
        name, _, at = item.partition("@")
        if name not in FAULT_KINDS:
            raise SystemExit(f"unknown fault {name!r}; choose from {', '.join(FAULT_KINDS)}")
        if not at:
            raise SystemExit(f"fault {item!r}: give a time, e.g. {name}@0.5 or {name}@60s")
        t = float(at[:-1]) if at.endswith("s") else float(at) * duration
        out.append({"fault": name, "scheduled_s": round(t, 1)})
    return sorted(out, key=lambda f: f["scheduled_s"])


# --- the load ------------------------------------------------------------------------------------------------------
def nifti_study(n_slices: int, size: int) -> bytes:
    from bench_studies import build_volume, nifti_bytes
    return nifti_bytes(build_volume(n_slices, size))


def plan_units(n_jobs: int, n_studies: int, batch_share: float, duration: float, rng: random.Random,
               study_slices: tuple[int, int]) -> list[dict]:
    """Submissions: singles, batches of 5-10 and studies, each with a time (slices spread evenly over
    `duration`) and an Idempotency-Key."""
    units, batch_slices = [], 0
    target = int(round(n_jobs * batch_share)) if n_jobs >= 5 else 0
    while batch_slices < target:
        n = min(rng.randint(5, 10), n_jobs - batch_slices)
        if n < 5 or target - batch_slices < 3:
            break
        units.append({"kind": "batch", "n": n})
        batch_slices += n
    units += [{"kind": "single", "n": 1} for _ in range(n_jobs - batch_slices)]
    rng.shuffle(units)
    for _ in range(n_studies):   # anywhere but the very end (so they finish within the run)
        units.insert(rng.randint(0, max(0, int(len(units) * 0.8))),
                     {"kind": "study", "n": rng.randint(*study_slices)})
    done = 0
    for i, u in enumerate(units):
        u["at"] = round(duration * done / max(1, n_jobs), 3)
        done += u["n"] if u["kind"] != "study" else 0
        u["key"] = f"soak-{i:05d}-{rng.getrandbits(48):012x}"
        u["files"] = [SLICES[rng.randrange(len(SLICES))].name for _ in range(u["n"])] if u["kind"] != "study" \
            else []
        u.update(ids=[], attempts=[], replay=False, rejected=None, gave_up=False)
    return units


class Load:
    """`clients` threads taking the units in order, each at its time, retrying with the same Idempotency-Key."""

    RETRY_STATUSES = (408, 429, 500, 502, 503, 504)

    def __init__(self, url, token, units, clients, clock, give_up, study_payloads):
        self.url, self.token, self.units, self.clients, self.clock = url, token, units, clients, clock
        self.give_up = give_up
        self.payloads = {p.name: p.read_bytes() for p in SLICES}
        self.study_payloads = study_payloads
        self.next = 0
        self.lock = threading.Lock()
        self.attempts: list[tuple[float, float, object]] = []    # (start, end, status code or error name)
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()

    def start(self):
        for i in range(self.clients):
            t = threading.Thread(target=self._client, name=f"soak-client-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def join(self):
        for t in self.threads:
            t.join()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def _take(self):
        with self.lock:
            if self.next >= len(self.units):
                return None
            u = self.units[self.next]
            self.next += 1
            return u

    def _client(self):
        import requests
        session = requests.Session()
        while not self.stop.is_set():
            u = self._take()
            if u is None:
                return
            self.clock.sleep_until(u["at"], self.stop)
            self._submit(session, u)

    def _submit(self, session, u):
        import requests
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": u["key"]}
        if u["kind"] == "study":
            path, timeout = "/api/v1/studies", 120
            files = [("file", ("volume.nii.gz", self.study_payloads[u["n"]], "application/gzip"))]
        else:
            path, timeout = "/api/v1/jobs", 60
            files = [("file", (name, self.payloads[name], "image/png")) for name in u["files"]]
        deadline = time.monotonic() + self.give_up
        delay = 0.25
        while True:
            t_start = self.clock.now()
            resp, outcome = None, None
            try:
                resp = session.post(self.url + path, files=files, headers=headers, timeout=timeout)
                outcome = resp.status_code
            except requests.RequestException as exc:
                outcome = type(exc).__name__
            t_end = self.clock.now()
            u["attempts"].append((round(t_start, 3), round(t_end, 3), outcome))
            self.attempts.append((t_start, t_end, outcome))
            if outcome in (200, 202):
                try:
                    body = resp.json()
                    u["ids"] = [body["id"]] if u["kind"] == "study" else [j["id"] for j in body["jobs"]]
                    u["replay"] = bool(body.get("idempotent_replay"))
                    u["accepted_at"] = round(t_end, 3)
                    return
                except (ValueError, KeyError, TypeError) as exc:
                    outcome = f"bad body: {exc}"
            elif isinstance(outcome, int) and outcome not in self.RETRY_STATUSES:
                u["rejected"] = f"HTTP {outcome}: {resp.text[:200]}"
                return
            if time.monotonic() > deadline or self.stop.is_set():
                u["gave_up"] = True
                return
            wait = delay
            if resp is not None and resp.status_code == 429:
                try:
                    wait = max(wait, float(resp.headers.get("Retry-After", 1)))
                except ValueError:
                    pass
            time.sleep(wait)
            delay = min(delay * 2, 3.0)


class Prober(threading.Thread):
    """GET /readyz every `interval` s: [(t, ok)]."""

    def __init__(self, url, clock, interval=0.25):
        super().__init__(name="soak-readyz", daemon=True)
        self.url, self.clock, self.interval = url, clock, interval
        self.samples: list[tuple[float, bool]] = []
        self.stop_event = threading.Event()

    def run(self):
        import requests
        while not self.stop_event.is_set():
            t = self.clock.now()
            try:
                ok = requests.get(self.url + "/readyz", timeout=3).status_code == 200
            except requests.RequestException:
                ok = False
            self.samples.append((t, ok))
            self.stop_event.wait(max(0.0, self.interval - (self.clock.now() - t)))


# --- the stack -----------------------------------------------------------------------------------------------------
class SoakStack:
    def __init__(self, base: Path, args):
        self.base, self.args = base, args
        self.services = None
        self.guard = None
        self.api = None
        self.workers: dict[str, object] = {}
        self.logs = {"interactive": base / "worker.log", "bulk": base / "worker-bulk.log"}
        self.engine = None
        self.storage = None
        self.env: dict = {}

    def start(self):
        a = self.args
        self.guard = localstack.StackGuard(self.base)     # whatever ends this script, the stack ends with it
        self.guard.claim()
        self.services = localstack.DataServices(self.base, "postgresql")
        self.services.start()
        s = self.services
        self.guard.add(s.redis.pid())
        self.guard.add(s.weed.proc.pid)
        cache = Path(a.cache_dir)
        self.env = dict(s.env, COVIDSEG_RATE_LIMIT_PER_MINUTE="0", COVIDSEG_DAILY_QUOTA="0",
                        COVIDSEG_HEARTBEAT_INTERVAL=str(a.heartbeat), COVIDSEG_STALE_AFTER=str(a.stale_after),
                        COVIDSEG_SWEEP_INTERVAL=str(a.sweep_interval),
                        COVIDSEG_DISPATCH_GRACE=str(a.dispatch_grace),
                        COVIDSEG_BROKER_VISIBILITY_TIMEOUT="900", COVIDSEG_LOG_LEVEL="INFO",
                        COVIDSEG_INFERENCE_BACKEND=a.backend, COVIDSEG_CACHE_DIR=str(cache),
                        COVIDSEG_WORKER_CONCURRENCY=str(a.worker_concurrency),
                        COVIDSEG_API_WORKERS="2", COVIDSEG_API_THREADS="8")
        from shared.service import db
        from shared.service.settings import Settings
        from shared.service.storage import Storage
        self.settings = Settings.from_env(self.env)
        self.engine = db.make_engine(self.settings)
        self.Session = db.make_sessionmaker(self.engine)
        self.storage = Storage.from_settings(self.settings)
        with self.Session() as session:           # in-process (no CLI start-up)
            _, self.token = db.create_token(session, "soak")
            session.commit()
        self.port = localstack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = localstack.start_api(self.env, self.base / "api.log", self.port, nice=a.nice,
                                        on_spawn=self.guard.add)
        probe = self.base / "probe"
        probe.mkdir(exist_ok=True)
        (probe / "covidseg_soak_probe.py").write_text(PROBE_SOURCE)
        self.probe = probe
        for role in ("interactive", "bulk"):
            self.workers[role] = self.start_worker(role)
        deadline = time.monotonic() + a.worker_timeout
        while not all(localstack.worker_ready(p) for p in self.logs.values()):
            for role, w in self.workers.items():
                if w.poll() is not None:
                    raise RuntimeError(f"{role} worker exited with {w.returncode}; see {self.logs[role]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {a.worker_timeout:.0f} s; see {self.base}")
            time.sleep(0.5)
        return self

    def start_worker(self, role: str):
        a = self.args
        queue, nice = ((self.settings.queue_interactive, a.nice) if role == "interactive" else
                       (self.settings.queue_bulk, min(19, a.nice + localstack.BULK_NICE)))
        proc = self._start_worker(role, queue, nice, self.probe)
        self.guard.add(proc.pid)
        return proc

    def _start_worker(self, role, queue, nice, probe):
        import subprocess
        cmd = [sys.executable, "-m", "celery", "-A", "covidseg_soak_probe", "worker", "-Q", queue, "--pool",
               "prefork", "-n", f"{WORKER_NAMES[role]}@%h", "--without-gossip", "--without-mingle",
               "--loglevel", "INFO"]
        if nice:
            cmd = ["nice", "-n", str(nice)] + cmd
        env = localstack.service_env(self.env, {"PYTHONPATH": os.pathsep.join([str(probe), str(REPO)])})
        log = open(self.logs[role], "ab")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return proc

    def stop_app(self):
        for w in self.workers.values():
            try:
                localstack.stop_process(w, signal.SIGTERM, timeout=60)
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                print(f"warning: {exc}", file=sys.stderr)
        self.workers = {}
        try:
            localstack.stop_process(self.api)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: {exc}", file=sys.stderr)
        self.api = None

    def stop(self):
        self.stop_app()
        if self.engine is not None:
            self.engine.dispose()
        if self.services is not None:
            if self.services.pg is not None and self.args.keep:
                try:
                    shutil.copy(self.services.pg.dir / "pg.log", self.base / "pg.log")
                except OSError:
                    pass
            try:
                self.services.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"warning: {exc}", file=sys.stderr)
        if self.guard is not None:
            self.guard.release()


class Supervisor(threading.Thread):
    """Restarts a worker whose main process exited, as docker-compose's `restart: unless-stopped` does in
    production, and records every such exit (an incident: a worker must survive the faults on its own)."""

    def __init__(self, stack: SoakStack, clock: Clock):
        super().__init__(name="soak-supervisor", daemon=True)
        self.stack, self.clock = stack, clock
        self.incidents: list[dict] = []
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.wait(1.0):
            api = self.stack.api
            if api is not None and api.poll() is not None and not self.stop_event.is_set():
                inc = {"worker": "api", "pid": api.pid, "exited_at_s": round(self.clock.now(), 1),
                       "returncode": api.returncode, "log": None}
                self.incidents.append(inc)
                print(f"[{inc['exited_at_s']:7.1f} s] INCIDENT: the API exited ({api.returncode}); restarting it",
                      flush=True)
                t0 = self.clock.now()
                self.stack.api = localstack.start_api(self.stack.env, self.stack.base / "api.log", self.stack.port,
                                                      nice=self.stack.args.nice, on_spawn=self.stack.guard.add)
                inc["restarted_ready_after_s"] = round(self.clock.now() - t0, 1)
            for role, w in list(self.stack.workers.items()):
                if w.poll() is None:
                    continue
                log = self.stack.logs[role]
                text = log.read_text(errors="replace")
                why = [ln for ln in text.splitlines() if "CRITICAL" in ln or "Unrecoverable" in ln][-1:]
                inc = {"worker": role, "pid": w.pid, "exited_at_s": round(self.clock.now(), 1),
                       "returncode": w.returncode, "log": why[0][:300] if why else None}
                self.incidents.append(inc)
                print(f"[{inc['exited_at_s']:7.1f} s] INCIDENT: the {role} worker exited ({w.returncode}): "
                      f"{inc['log']}; restarting it", flush=True)
                if self.stop_event.is_set():
                    return
                offset = log.stat().st_size
                t0 = self.clock.now()
                self.stack.workers[role] = self.stack.start_worker(role)
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline and not self.stop_event.is_set():
                    if localstack.worker_ready(log, offset):
                        inc["restarted_ready_after_s"] = round(self.clock.now() - t0, 1)
                        break
                    time.sleep(0.5)


# --- faults --------------------------------------------------------------------------------------------------------
class Faults(threading.Thread):
    def __init__(self, stack: SoakStack, plan: list[dict], clock: Clock, down: float, busy_wait: float = 15.0):
        super().__init__(name="soak-faults", daemon=True)
        self.stack, self.plan, self.clock, self.down, self.busy_wait = stack, plan, clock, down, busy_wait
        self.records: list[dict] = []
        self.watchers: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.error = None

    def run(self):
        try:
            for f in self.plan:
                self.clock.sleep_until(f["scheduled_s"], self.stop_event)
                if self.stop_event.is_set():
                    return
                rec = dict(f)
                self.records.append(rec)
                rec["at_s"] = round(self.clock.now(), 2)
                print(f"[{rec['at_s']:7.1f} s] fault: {f['fault']}", flush=True)
                try:
                    getattr(self, "_" + f["fault"])(rec)
                except Exception as exc:  # noqa: BLE001 - record it, carry on with the schedule
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"  fault {f['fault']} failed: {rec['error']}", flush=True)
                rec["action_done_s"] = round(self.clock.now(), 2)
                rec["action_s"] = round(rec["action_done_s"] - rec["at_s"], 2)
        except Exception as exc:  # noqa: BLE001
            self.error = exc

    # infrastructure: stop, wait `down` s, start the same server again
    def _redis(self, rec):
        r = self.stack.services.redis
        r.stop()
        time.sleep(self.down)
        r.start()
        self.stack.guard.add(r.pid())

    def _s3(self, rec):
        w = self.stack.services.weed
        w.stop()
        time.sleep(self.down)
        w.start(on_spawn=self.stack.guard.add)

    def _postgres(self, rec):
        self.stack.services.pg.restart(down=self.down)

    # a worker's pool process
    def _kill_worker(self, rec, role="interactive"):
        from sqlalchemy import select

        from shared.service import db
        master = self.stack.workers[role]
        children = _children(master.pid)
        victim, held = None, []
        deadline = time.monotonic() + self.busy_wait     # prefer a process that is running a job
        while victim is None and time.monotonic() < deadline:
            try:
                with self.stack.Session() as session:
                    rows = session.execute(select(db.Job.worker).where(
                        db.Job.status == db.RUNNING,
                        db.Job.worker.like(f"{WORKER_NAMES[role]}@%"))).scalars().all()
                victim = next((p for p in (int(w.rsplit(":", 1)[1]) for w in rows) if p in children), None)
            except Exception as exc:  # noqa: BLE001 - then any pool process
                rec["note"] = f"busy process not found ({type(exc).__name__})"
                break
            if victim is None:
                time.sleep(0.2)
        if victim is None and children:
            victim = random.choice(sorted(children))
        if victim is None:
            raise RuntimeError(f"the {role} worker has no pool process")
        assert victim != master.pid and _ppid(victim) == master.pid, "not a pool child of our worker"
        with self.stack.Session() as session:
            held = session.execute(select(db.Job.id).where(
                db.Job.status == db.RUNNING, db.Job.worker.like(f"%:{victim}"))).scalars().all()
        log = self.stack.logs[role]
        log_offset = log.stat().st_size
        os.kill(victim, signal.SIGKILL)
        rec.update(worker=role, pid=victim, busy=bool(held), held_jobs=len(held))
        t_kill = self.clock.now()
        w = threading.Thread(target=self._watch_kill, args=(rec, master, children, log, log_offset, held, t_kill),
                             daemon=True)
        w.start()
        self.watchers.append(w)

    def _kill_bulk(self, rec):
        self._kill_worker(rec, role="bulk")

    def _watch_kill(self, rec, master, before, log, offset, held, t_kill, timeout=900):
        from sqlalchemy import select

        from shared.service import db
        deadline = time.monotonic() + timeout
        replaced = held_done = None
        while time.monotonic() < deadline and (replaced is None or (held and held_done is None)):
            if replaced is None:
                new = _children(master.pid) - before
                text = log.read_bytes()[offset:].decode("utf-8", "replace")
                if any(f"model loaded in process {p}" in text for p in new):
                    replaced = self.clock.now() - t_kill
                    rec["replacement_ready_s"] = round(replaced, 1)
            if held and held_done is None:
                try:
                    with self.stack.Session() as session:
                        active = session.execute(select(db.Job.id).where(
                            db.Job.id.in_(held), db.Job.status.in_(db.ACTIVE))).scalars().all()
                    if not active:
                        held_done = self.clock.now() - t_kill
                        rec["held_jobs_finished_s"] = round(held_done, 1)
                except Exception:  # noqa: BLE001 - the database may be restarting
                    pass
            time.sleep(0.5)


def outage_stats(rec: dict, probes, attempts, until: float | None = None, window: float = 30.0) -> None:
    """Add /readyz and submission unavailability around one fault to `rec` (times relative to the load): from
    the fault to `window` s after its action ended, or to the next fault (`until`) if that comes first."""
    t_a, t_b = rec["at_s"], rec.get("action_done_s", rec["at_s"])
    lo, hi = t_a - 0.5, t_b + window
    if until is not None:
        hi = max(t_b, min(hi, until - 0.5))
    fails = [t for t, ok in probes if lo <= t <= hi and not ok]
    if fails:
        first = fails[0]
        after = [t for t, ok in probes if t > first and ok and t >= fails[-1]]
        rec["readyz_unavailable_s"] = round((after[0] if after else probes[-1][0]) - first, 2)
    else:
        rec["readyz_unavailable_s"] = 0.0
    bad = [(s, e, o) for s, e, o in attempts if lo <= s <= hi and o not in (200, 202)]
    rec["submit_failures"] = len(bad)
    if bad:
        first, last = min(s for s, _, _ in bad), max(s for s, _, _ in bad)
        ok_after = [e for s, e, o in attempts if o in (200, 202) and s >= last]
        rec["submit_unavailable_s"] = round((min(ok_after) if ok_after else last) - first, 2)
    else:
        rec["submit_unavailable_s"] = 0.0
    oks = sorted(e for s, e, o in attempts if o in (200, 202) and t_a - 5 <= e <= hi)
    gaps = [b - a for a, b in zip(oks, oks[1:])]
    rec["longest_submit_gap_s"] = round(max(gaps), 2) if gaps else None
    rec["failure_kinds"] = dict(Counter(str(o) for _, _, o in bad))


# --- reconciliation ------------------------------------------------------------------------------------------------
def wait_drained(stack: SoakStack, clock: Clock, timeout: float) -> dict:
    from sqlalchemy import func, select

    from shared.service import db
    deadline = time.monotonic() + timeout
    last_print = 0.0
    counts = {}
    while True:
        try:
            with stack.Session() as session:
                counts = {"jobs": dict(session.execute(select(db.Job.status, func.count()).group_by(
                    db.Job.status)).all()),
                          "studies": dict(session.execute(select(db.Study.status, func.count()).group_by(
                              db.Study.status)).all())}
            active = sum(counts["jobs"].get(s, 0) + counts["studies"].get(s, 0) for s in db.ACTIVE)
        except Exception as exc:  # noqa: BLE001
            active, counts = None, {"error": str(exc)}
        if time.monotonic() - last_print > 30:
            last_print = time.monotonic()
            print(f"[{clock.now():7.1f} s] draining: {counts}", flush=True)
        if active == 0:
            return {"drained": True, "counts": counts}
        if time.monotonic() > deadline:
            return {"drained": False, "counts": counts}
        time.sleep(2)


def reconcile(stack: SoakStack, units: list[dict], verify_checksums: bool = True) -> dict:
    from sqlalchemy import select

    from shared.service import db
    s = stack.settings
    now = db.utcnow()
    sweep_limit = s.stale_after + s.dispatch_grace + 2 * s.sweep_interval
    with stack.Session() as session:
        jobs = {r.id: r for r in session.execute(select(
            db.Job.id, db.Job.status, db.Job.attempts, db.Job.retries, db.Job.error, db.Job.updated_at,
            db.Job.heartbeat_at, db.Job.result_checksums, db.Job.batch_id)).all()}
        studies = {r.id: r for r in session.execute(select(
            db.Study.id, db.Study.status, db.Study.attempts, db.Study.retries, db.Study.error,
            db.Study.updated_at, db.Study.heartbeat_at, db.Study.result_checksums)).all()}

    acc_jobs = [i for u in units if u["kind"] != "study" for i in u["ids"]]
    acc_studies = [i for u in units if u["kind"] == "study" for i in u["ids"]]
    out: dict = {}

    def side(rows, accepted, what):
        acc = set(accepted)
        status = Counter(rows[i].status for i in acc if i in rows)
        missing = sorted(acc - set(rows))
        not_terminal = sorted(i for i in acc if i in rows and rows[i].status not in db.TERMINAL)
        stuck = sorted(i for i, r in rows.items() if r.status in db.ACTIVE and
                       max(t for t in (r.updated_at, r.heartbeat_at) if t is not None)
                       < now - timedelta(seconds=sweep_limit))
        unaccepted = sorted(set(rows) - acc)
        return {f"{what}_accepted": len(acc), "accepted_twice": len(accepted) - len(acc),
                "succeeded": status.get(db.SUCCEEDED, 0), "failed": status.get(db.FAILED, 0),
                "cancelled": status.get(db.CANCELLED, 0), "terminal": sum(status[t] for t in db.TERMINAL),
                "lost": len(missing) + len(not_terminal), "lost_not_in_db": missing[:20],
                "lost_not_terminal": not_terminal[:20], "stuck": len(stuck), "stuck_ids": stuck[:20],
                "rows_no_client_was_given": len(unaccepted), "rows_no_client_was_given_ids": unaccepted[:20],
                "errors": dict(Counter((rows[i].error or "")[:120] for i in acc
                                       if i in rows and rows[i].status == db.FAILED)),
                "failed_ids": sorted(i for i in acc if i in rows and rows[i].status == db.FAILED)[:20]}
    out["jobs"] = side(jobs, acc_jobs, "jobs")
    out["studies"] = side(studies, acc_studies, "studies")
    out["sweep_limit_s"] = sweep_limit

    # --- the bucket
    keys = stack.storage.list_keys("")
    inputs, results, study_objs, other = set(), defaultdict(set), defaultdict(set), []
    for k in keys:
        parts = k.split("/", 2)
        if parts[0] == "inputs" and len(parts) == 2:
            inputs.add(parts[1])
        elif parts[0] == "results" and len(parts) == 3:
            results[parts[1]].add(parts[2])
        elif parts[0] == "studies" and len(parts) == 3:
            study_objs[parts[1]].add(parts[2])
        else:
            other.append(k)
    b: dict = {"objects": len(keys)}
    succeeded = [i for i, r in jobs.items() if r.status == db.SUCCEEDED]
    complete, incomplete, extras = [], [], []
    for i in succeeded:
        names = results.get(i, set())
        if names == RESULT_NAMES:
            complete.append(i)
        elif names - RESULT_NAMES:
            extras.append(i)
        else:
            incomplete.append(i)
    bad_sums = []
    if verify_checksums and complete:
        def check(i):
            want = json.loads(jobs[i].result_checksums or "{}")
            for kind in ("mask", "probability", "overlay"):
                meta = stack.storage.client.stat_object(stack.storage.bucket, f"results/{i}/{kind}.png").metadata
                got = meta.get("x-amz-meta-sha256") or meta.get("X-Amz-Meta-Sha256")
                if got != want.get(kind):
                    return i
            return None
        with ThreadPoolExecutor(8) as pool:
            bad_sums = [i for i in pool.map(check, complete) if i]
    b["job_result_sets_complete"] = len(complete) - len(bad_sums)
    b["job_result_sets_incomplete"] = len(incomplete)
    b["job_result_sets_with_extra_objects"] = len(extras)
    b["job_result_checksum_mismatches"] = len(bad_sums)
    b["checksums_verified"] = bool(verify_checksums)
    b["jobs_missing_input"] = len(set(jobs) - inputs)
    orphan_inputs = sorted(inputs - set(jobs))
    orphan_results = sorted(i for i in results if i not in jobs)
    stray_results = sorted(i for i in results if i in jobs and jobs[i].status != db.SUCCEEDED)
    orphan_studies = sorted(i for i in study_objs if i not in studies)
    b["orphan_objects"] = {"inputs": len(orphan_inputs),
                           "results": sum(len(results[i]) for i in orphan_results),
                           "studies": sum(len(study_objs[i]) for i in orphan_studies),
                           "other": len(other)}
    b["orphan_objects"]["total"] = sum(b["orphan_objects"].values())
    b["orphan_examples"] = {"inputs": orphan_inputs[:10], "results": orphan_results[:10],
                            "studies": orphan_studies[:10], "other": other[:10]}
    b["result_objects_of_unsucceeded_jobs"] = sum(len(results[i]) for i in stray_results)
    s_complete, s_bad, s_no_input, s_stray = 0, [], [], []
    for i, r in studies.items():
        objs = study_objs.get(i, set())
        if "input.tar" not in objs:
            s_no_input.append(i)
        got = {o[len("results/"):] for o in objs if o.startswith("results/")}
        if r.status == db.SUCCEEDED:
            want = set(json.loads(r.result_checksums or "{}"))
            if got == want and want:
                s_complete += 1
            else:
                s_bad.append({"id": i, "missing": sorted(want - got)[:5], "extra": sorted(got - want)[:5]})
        elif got:
            s_stray.append(i)
    b["study_result_sets_complete"] = s_complete
    b["study_result_sets_not_exact"] = len(s_bad)
    b["study_result_set_problems"] = s_bad[:10]
    b["studies_missing_input"] = len(s_no_input)
    b["result_objects_of_unsucceeded_studies"] = len(s_stray)
    out["bucket"] = b
    # a second result set for one submission: a row no client was given that succeeded, or extra objects
    dup_rows = [i for i in out["jobs"]["rows_no_client_was_given_ids"] if jobs[i].status == db.SUCCEEDED]
    out["duplicated_result_sets"] = len(dup_rows) + len(extras) + sum(
        1 for i in set(studies) - set(acc_studies) if studies[i].status == db.SUCCEEDED)
    out["_jobs"], out["_studies"] = jobs, studies
    return out


def model_runs(logs: list[Path], jobs: dict, studies: dict) -> dict:
    runs, per_lease = Counter(), Counter()
    timing_slices = 0
    for p in logs:
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        for m in _RUN_LINE.finditer(text):
            kind, _, lease, ids = m.groups()
            for i in [x for x in ids.split(",") if x]:
                runs[(kind, i)] += 1
                per_lease[(kind, i, lease)] += 1
        timing_slices += sum(int(x) for x in _TIMINGS.findall(text))
    out = {}
    for kind, plural, rows in (("job", "jobs", jobs), ("study", "studies", studies)):
        r = {i: n for (k, i), n in runs.items() if k == kind}
        beyond = {i: n - rows[i].attempts for i, n in r.items() if i in rows and n > rows[i].attempts}
        same_lease = sorted({i for (k, i, _), n in per_lease.items() if k == kind and n > 1})
        unknown = sorted(i for i in r if i not in rows)
        no_run = sorted(i for i, row in rows.items() if row.status == "succeeded" and i not in r)
        out[plural] = {
            "model_runs": sum(r.values()), "attempts": sum(row.attempts for row in rows.values()),
            "runs_beyond_attempts": sum(beyond.values()), "runs_beyond_attempts_ids": sorted(beyond)[:20],
            "same_lease_runs": len(same_lease), "same_lease_ids": same_lease[:20],
            "rerun": sum(1 for n in r.values() if n > 1), "max_runs": max(r.values(), default=0),
            "attempts_gt_1": sum(1 for row in rows.values() if row.attempts > 1),
            "runs_of_unknown_ids": len(unknown), "succeeded_without_a_logged_run": len(no_run),
            "succeeded_without_a_logged_run_ids": no_run[:10]}
        out[plural]["duplicates"] = out[plural]["runs_beyond_attempts"] + len(same_lease)
    out["completed_task_slices_from_timings"] = timing_slices
    return out


# --- report ----------------------------------------------------------------------------------------------------------
def problems_of(res: dict) -> list[str]:
    p = []
    rec, load, mr = res["reconciliation"], res["load"], res["model_runs"]
    for what in ("jobs", "studies"):
        r = rec[what]
        if r["lost"]:
            p.append(f"{r['lost']} {what} lost")
        if r["stuck"]:
            p.append(f"{r['stuck']} {what} stuck")
        if r["rows_no_client_was_given"]:
            p.append(f"{r['rows_no_client_was_given']} {what} rows no client was given")
        if r["failed"]:
            p.append(f"{r['failed']} {what} failed")
    b = rec["bucket"]
    for k in ("job_result_sets_incomplete", "job_result_sets_with_extra_objects", "job_result_checksum_mismatches",
              "jobs_missing_input", "result_objects_of_unsucceeded_jobs", "study_result_sets_not_exact",
              "studies_missing_input", "result_objects_of_unsucceeded_studies"):
        if b[k]:
            p.append(f"{k.replace('_', ' ')}: {b[k]}")
    if b["orphan_objects"]["total"]:
        p.append(f"{b['orphan_objects']['total']} orphan objects {b['orphan_objects']}")
    if rec["duplicated_result_sets"]:
        p.append(f"{rec['duplicated_result_sets']} duplicated result sets")
    for kind in ("jobs", "studies"):
        if mr[kind]["duplicates"]:
            p.append(f"{mr[kind]['duplicates']} duplicate model runs of {kind}")
        if mr[kind]["succeeded_without_a_logged_run"]:
            p.append(f"{mr[kind]['succeeded_without_a_logged_run']} {kind} succeeded without a logged model run")
    if load["rejected"]:
        p.append(f"{load['rejected']} submissions rejected")
    if load["gave_up"]:
        p.append(f"{load['gave_up']} submissions given up")
    if not res["drain"]["drained"]:
        p.append("queue not drained before the timeout")
    for inc in res.get("worker_incidents", []):
        p.append(f"the {inc['worker']} worker exited at {inc['exited_at_s']} s ({inc['log']}); restarted")
    for f in res["faults"]:
        if f.get("error"):
            p.append(f"fault {f['fault']} failed: {f['error']}")
    return p


def print_table(res: dict) -> None:
    rec, load, mr, b = res["reconciliation"], res["load"], res["model_runs"], res["reconciliation"]["bucket"]
    j, st = rec["jobs"], rec["studies"]
    rows = [
        ("jobs submitted (slices)", f"{load['slices']} ({load['singles']} single, {load['batch_slices']} in "
                                    f"{load['batches']} batches) + {load['studies']} studies, {load['clients']} clients"),
        ("submissions / HTTP attempts", f"{load['units']} / {load['http_attempts']} ({load['retried_units']} retried, "
                                        f"{load['replays']} idempotent replays, {load['rejected']} rejected, "
                                        f"{load['gave_up']} given up)"),
        ("jobs accepted", j["jobs_accepted"]),
        ("jobs succeeded / failed / cancelled", f"{j['succeeded']} / {j['failed']} / {j['cancelled']}"
                                                + (f" (failed: {j['errors']})" if j["errors"] else "")),
        ("jobs lost", j["lost"]),
        ("jobs stuck", f"{j['stuck']} (sweep limit {rec['sweep_limit_s']:g} s)"),
        ("job rows no client was given", j["rows_no_client_was_given"]),
        ("studies accepted / succeeded / failed / lost / stuck",
         f"{st['studies_accepted']} / {st['succeeded']} / {st['failed']} / {st['lost']} / {st['stuck']}"),
        ("complete result sets (jobs; studies)",
         f"{b['job_result_sets_complete']} of {j['succeeded']} (incomplete {b['job_result_sets_incomplete']}, "
         f"checksum mismatches {b['job_result_checksum_mismatches']}); {b['study_result_sets_complete']} of "
         f"{st['succeeded']}"),
        ("duplicated result sets", rec["duplicated_result_sets"]),
        ("orphan objects", f"{b['orphan_objects']['total']} (inputs {b['orphan_objects']['inputs']}, results "
                           f"{b['orphan_objects']['results']}, studies {b['orphan_objects']['studies']}, other "
                           f"{b['orphan_objects']['other']}); result objects of unsucceeded jobs "
                           f"{b['result_objects_of_unsucceeded_jobs']}"),
        ("model runs vs attempts (jobs)",
         f"{mr['jobs']['model_runs']} runs / {mr['jobs']['attempts']} attempts: {mr['jobs']['runs_beyond_attempts']}"
         f" beyond attempts, {mr['jobs']['same_lease_runs']} twice under one lease; {mr['jobs']['rerun']} jobs "
         f"re-run (kill/takeover)"),
        ("model runs vs attempts (studies)",
         f"{mr['studies']['model_runs']} / {mr['studies']['attempts']}: {mr['studies']['duplicates']} duplicates, "
         f"{mr['studies']['rerun']} re-run"),
        ("wall time", f"load {res['timing']['load_s']} s, drained at {res['timing']['drained_at_s']} s, "
                      f"{res['timing']['slices_per_s']} slices/s"),
    ]
    print("\n| soak | result |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if res["faults"]:
        print("\n| fault | at s | action s | /readyz unavailable s | submissions unavailable s (failed attempts) "
              "| longest gap between accepted submissions s | notes |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for f in res["faults"]:
            if f["fault"].startswith("kill"):
                note = (f"pid {f.get('pid')} ({f.get('worker')} pool), held {f.get('held_jobs')} jobs; replacement "
                        f"loaded the model after {f.get('replacement_ready_s')} s; held jobs finished after "
                        f"{f.get('held_jobs_finished_s', '-')} s")
            else:
                note = f"stopped, {res['config']['fault_down_s']:g} s down, started"
            if f.get("error"):
                note += f"; ERROR {f['error']}"
            print(f"| {f['fault']} | {f['at_s']} | {f.get('action_s')} | {f.get('readyz_unavailable_s')} | "
                  f"{f.get('submit_unavailable_s')} ({f.get('submit_failures')}) | {f.get('longest_submit_gap_s')} "
                  f"| {note} |")
    for inc in res.get("worker_incidents", []):
        print(f"\nincident: the {inc['worker']} worker (pid {inc['pid']}) exited at {inc['exited_at_s']} s with "
              f"{inc['returncode']}: {inc['log']}; restarted, ready after {inc.get('restarted_ready_after_s')} s")
    v = res["verdict"]
    print(f"\nverdict: {'OK' if v['ok'] else 'PROBLEMS'}" + ("" if v["ok"] else ": " + "; ".join(v["problems"])))


# --- main ------------------------------------------------------------------------------------------------------------
def int8_sources() -> list[Path]:
    """Caches that may hold an INT8 model converted before: COVIDSEG_CACHE_DIR (a test session's), the default
    one and the soak's own."""
    env = [Path(os.environ["COVIDSEG_CACHE_DIR"])] if os.environ.get("COVIDSEG_CACHE_DIR") else []
    return [*env, Path.home() / ".cache" / "covidseg", REPO / "artifacts" / "soak-cache"]


def _seed_cache(cache: Path) -> None:
    """Reuse an INT8 model converted before, so a first soak (or a test's fresh cache) does not convert again."""
    if any(cache.glob("onnx/*.int8.onnx")):
        return
    for src in int8_sources():
        found = sorted((src / "onnx").glob("*.int8.onnx")) if src.resolve() != cache.resolve() else []
        if found:
            (cache / "onnx").mkdir(parents=True, exist_ok=True)
            for p in found:
                info = p.with_name(p.name[:-len(".onnx")] + ".json")
                if info.is_file():
                    shutil.copy2(p, cache / "onnx" / p.name)
                    shutil.copy2(info, cache / "onnx" / info.name)
            return


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2000, help="slices to submit (singles and batches)")
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients")
    ap.add_argument("--studies", type=int, default=None, help="whole studies to submit (default jobs // 250, >= 1)")
    ap.add_argument("--study-slices", default="8-12", help="slices per study, e.g. 8-12")
    ap.add_argument("--study-size", type=int, default=256, help="study slice size (pixels)")
    ap.add_argument("--batch-share", type=float, default=0.25, help="share of the slices sent in batches of 5-10")
    ap.add_argument("--duration-hint", type=float, default=None,
                    help="seconds over which submissions are spread and faults scheduled (default jobs / 4)")
    ap.add_argument("--faults", default=DEFAULT_FAULTS,
                    help=f"comma list of fault@when (fraction of the duration, or seconds with 's'); kinds: "
                         f"{', '.join(FAULT_KINDS)}; '' = none (default {DEFAULT_FAULTS})")
    ap.add_argument("--fault-down", type=float, default=2.0, help="seconds a restarted server stays down")
    ap.add_argument("--out", "--json", dest="out", default=str(REPO / "artifacts" / "soak.json"))
    ap.add_argument("--keep", action="store_true", help="keep the run directory (logs, data) and print it")
    ap.add_argument("--backend", default="auto", choices=("auto", "fp32", "int8", "bf16"),
                    help="COVIDSEG_INFERENCE_BACKEND of the workers")
    ap.add_argument("--cache-dir", default=str(REPO / "artifacts" / "soak-cache"),
                    help="COVIDSEG_CACHE_DIR (the INT8 conversion, reused by later runs)")
    ap.add_argument("--worker-concurrency", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0, help="nice level of the API and interactive worker "
                                                        f"(the bulk worker runs {localstack.BULK_NICE} nicer)")
    ap.add_argument("--heartbeat", type=float, default=2.0)
    ap.add_argument("--stale-after", type=float, default=20.0)
    ap.add_argument("--sweep-interval", type=float, default=5.0)
    ap.add_argument("--dispatch-grace", type=float, default=15.0)
    ap.add_argument("--give-up", type=float, default=180.0, help="a client gives a submission up after this long")
    ap.add_argument("--drain-timeout", type=float, default=1200.0)
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="wait this long for the workers to load")
    ap.add_argument("--no-verify-checksums", action="store_true")
    ap.add_argument("--no-supervise", action="store_true",
                    help="do not restart a worker whose main process exited (production restarts it)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    duration = args.duration_hint or max(20.0, args.jobs / 4.0)
    n_studies = args.studies if args.studies is not None else max(1, args.jobs // 250)
    lo, _, hi = args.study_slices.partition("-")
    study_slices = (int(lo), int(hi or lo))
    faults_plan = parse_faults(args.faults, duration)
    rng = random.Random(args.seed)
    units = plan_units(args.jobs, n_studies, args.batch_share, duration, rng, study_slices)
    study_payloads = {n: nifti_study(n, args.study_size) for n in {u["n"] for u in units if u["kind"] == "study"}}
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if args.backend in ("auto", "int8"):
        _seed_cache(cache)

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    base = Path(tempfile.mkdtemp(prefix="covidseg-soak-"))
    print(f"soak: {args.jobs} slices + {n_studies} studies from {args.clients} clients over ~{duration:.0f} s, "
          f"faults {[(f['fault'], f['scheduled_s']) for f in faults_plan]}; run directory {base}", flush=True)
    stack = SoakStack(base, args)
    res: dict = {}
    t_begin = time.monotonic()
    try:
        stack.start()
        print(f"stack up in {time.monotonic() - t_begin:.0f} s: API {stack.url}, backend {args.backend}", flush=True)
        clock = Clock()
        prober = Prober(stack.url, clock)
        load = Load(stack.url, stack.token, units, args.clients, clock, args.give_up, study_payloads)
        faults = Faults(stack, faults_plan, clock, args.fault_down)
        supervisor = Supervisor(stack, clock)
        if not args.no_supervise:
            supervisor.start()
        prober.start()
        load.start()
        faults.start()
        last = 0.0
        while load.alive():
            time.sleep(1)
            if clock.now() - last >= 30:
                last = clock.now()
                acc = sum(len(u["ids"]) for u in units if u["kind"] != "study")
                print(f"[{clock.now():7.1f} s] submitted {load.next}/{len(units)} submissions, {acc} jobs accepted, "
                      f"{len(load.attempts)} HTTP attempts", flush=True)
        load_s = clock.now()
        faults.join()
        drain = wait_drained(stack, clock, args.drain_timeout)
        drained_at = clock.now()
        for w in faults.watchers:
            w.join(timeout=5)
        prober.stop_event.set()
        prober.join(timeout=5)
        supervisor.stop_event.set()
        if supervisor.is_alive():
            supervisor.join(timeout=60)
        print(f"[{clock.now():7.1f} s] drained={drain['drained']}; reconciling", flush=True)
        stack.stop_app()           # workers flush their logs; the database and the bucket stay up
        rec = reconcile(stack, units, verify_checksums=not args.no_verify_checksums)
        jobs_rows, study_rows = rec.pop("_jobs"), rec.pop("_studies")
        runs = model_runs(list(stack.logs.values()), jobs_rows, study_rows)
        for f, after in zip(faults.records, faults.records[1:] + [None]):
            outage_stats(f, prober.samples, load.attempts, until=after["at_s"] if after else None)
        job_units = [u for u in units if u["kind"] != "study"]
        slices_done = rec["jobs"]["succeeded"] + sum(u["n"] for u in units if u["kind"] == "study" and u["ids"])
        res = {
            "config": {"jobs": args.jobs, "clients": args.clients, "studies": n_studies,
                       "study_slices": args.study_slices, "study_size": args.study_size,
                       "duration_hint_s": duration, "faults": args.faults, "fault_down_s": args.fault_down,
                       "backend": args.backend, "worker_concurrency": args.worker_concurrency,
                       "heartbeat_s": args.heartbeat, "stale_after_s": args.stale_after,
                       "sweep_interval_s": args.sweep_interval, "dispatch_grace_s": args.dispatch_grace,
                       "db": "postgresql", "seed": args.seed},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                        "note": "2 shared cores; other processes (e.g. a training run) may be using them"},
            "load": {"units": len(units), "slices": args.jobs, "clients": args.clients,
                     "singles": sum(1 for u in units if u["kind"] == "single"),
                     "batches": sum(1 for u in units if u["kind"] == "batch"),
                     "batch_slices": sum(u["n"] for u in units if u["kind"] == "batch"),
                     "studies": n_studies, "http_attempts": len(load.attempts),
                     "retried_units": sum(1 for u in units if len(u["attempts"]) > 1),
                     "replays": sum(1 for u in units if u["replay"]),
                     "rejected": sum(1 for u in units if u["rejected"]),
                     "rejections": [u["rejected"] for u in units if u["rejected"]][:10],
                     "gave_up": sum(1 for u in units if u["gave_up"]),
                     "jobs_accepted": sum(len(u["ids"]) for u in job_units),
                     "attempt_outcomes": dict(Counter(str(o) for _, _, o in load.attempts))},
            "faults": faults.records,
            "worker_incidents": supervisor.incidents,
            "drain": drain,
            "reconciliation": rec,
            "model_runs": runs,
            "timing": {"startup_s": round(clock.t0 - t_begin, 1), "load_s": round(load_s, 1),
                       "drained_at_s": round(drained_at, 1),
                       "slices_per_s": round(slices_done / drained_at, 2) if drained_at else None},
            "run_dir": str(base) if args.keep else None,
        }
        problems = problems_of(res)
        res["verdict"] = {"ok": not problems, "problems": problems}
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stack.stop()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print_table(res)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {out}")
    return 0 if res["verdict"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
