#!/usr/bin/env python3
"""Job-service benchmark (`make bench-service`, part of `make bench`).

Starts a throwaway stack on this machine (redis-server, SeaweedFS S3, PostgreSQL — or SQLite with --db sqlite —,
the API under gunicorn), then measures the submit path and the end-to-end pipeline. Prints tables, writes JSON.

Submit latency = POST /api/v1/jobs with one real 54 KB CT slice (PNG), from sending the request to the 202, with
no worker running (the jobs just queue), so the numbers are the submit path's own. Two load models:

* **closed loop** (`--clients 1,10,50`): C clients, each on its own keep-alive connection, send their next
  request the moment the previous one returns (zero think time). The server's throughput X then fixes the mean
  latency (Little's law: mean = C / X), so at C = 50 a p99 below 50 ms needs X > 1000 requests/s whatever the
  code does; the table prints X and that bound next to the percentiles.
* **open loop** (`--rates`): requests arrive on a Poisson schedule at a fixed rate (default: 25 %, 50 % and
  75 % of the closed-loop capacity measured at 50 clients), sent over up to 50 concurrent connections (the "50
  clients"). Latency counts from the scheduled arrival, so a stalled server cannot hide queueing (no coordinated
  omission).

Each request uses a fresh random multipart boundary, as real clients do. Clients are plain http.client in several
processes (threads within each) so the client side costs little CPU; the CPU time every component spent per
request (API, S3, database, Redis, clients) is read from /proc and reported.

End to end (`--batch`, `--singles`), with ONE worker (both queues; its pool has `--worker-concurrency`
processes, default COVIDSEG_WORKER_CONCURRENCY = 2):
* bare inference reference: `covidseg bench --backends int8 --processes N` run at the same nice level just before
  and just after (model only, batch 8; the ratios use the mean of the two): the single-process rate (the
  target's denominator as written) and the rate of N processes at once (the same layout as the worker's pool, so
  `vs_bare_pool` is the pipeline's own overhead), and the single-process whole path (decode + preprocess + infer
  + render);
* a batch of `--batch` slices from submit to its last `finished_at`, and the worker-side span (first start to
  last finish), both from the job table's timestamps (the client polls only once a second, to leave the CPU to
  the worker);
* `--burst` single-slice jobs submitted at once (the interactive queue; the worker gathers them into batches);
* single-job latency (submit -> succeeded) of `--singles` sequential interactive jobs.

Benchmarks never run as timed test assertions.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import localstack  # noqa: E402

SLICES = REPO / "tests" / "fixtures" / "slices"
SLICE = SLICES / "covid_0300.png"
OPEN_LOOP_CONNECTIONS = 50


def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of `values`; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --- CPU accounting from /proc -----------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime in seconds) of every live process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode("latin-1")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def tree_cpu(roots: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds used so far by each named process tree (root pid and its live descendants)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for name, root in roots.items():
        total, stack = 0.0, [root] if root else []
        while stack:
            pid = stack.pop()
            if pid in table:
                total += table[pid][1]
                stack.extend(children.get(pid, []))
        out[name] = total
    return out


# --- clients ---------------------------------------------------------------------------------------------------
class Client:
    """One keep-alive connection posting one slice per request, with a fresh multipart boundary each time."""

    def __init__(self, host, port, token, payload):
        self.host, self.port, self.token, self.payload = host, port, token, payload
        self.conn = None

    def submit(self) -> str | None:
        """POST one job; None on 202, else a short error description."""
        boundary = os.urandom(12).hex()
        body = b"".join([b"--", boundary.encode(), b'\r\nContent-Disposition: form-data; name="file"; '
                         b'filename="slice.png"\r\nContent-Type: image/png\r\n\r\n', self.payload,
                         b"\r\n--", boundary.encode(), b"--\r\n"])
        headers = {"Authorization": f"Bearer {self.token}",
                   "Content-Type": f"multipart/form-data; boundary={boundary}"}
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self.conn.request("POST", "/api/v1/jobs", body, headers)
            resp = self.conn.getresponse()
            resp.read()
            if resp.will_close:
                self.conn.close()
                self.conn = None
            return None if resp.status == 202 else f"HTTP {resp.status}"
        except Exception as exc:  # noqa: BLE001 - counted as an error, next request reconnects
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            return type(exc).__name__


def _closed_loop_proc(addr, token, payload, threads, per_thread, start_at, out_q):
    lat, errors = [], []
    lock = threading.Lock()

    def run():
        c = Client(*addr, token, payload)
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        for _ in range(per_thread):
            t0 = time.perf_counter()
            err = c.submit()
            dt = time.perf_counter() - t0
            with lock:
                (errors.append(err) if err else lat.append(dt))
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out_q.put((lat, errors, sum(os.times()[:2])))


def _open_loop_proc(addr, token, payload, arrivals, connections, out_q):
    import queue as _queue

    lat, errors = [], []
    lock = threading.Lock()
    work: _queue.Queue = _queue.Queue()

    def sender():
        c = Client(*addr, token, payload)
        while True:
            sched = work.get()
            if sched is None:
                return
            err = c.submit()
            dt = time.perf_counter() - sched       # from the scheduled arrival time
            with lock:
                (errors.append(err) if err else lat.append(dt))
    senders = [threading.Thread(target=sender) for _ in range(connections)]
    for t in senders:
        t.start()
    for sched in arrivals:
        delay = sched - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        work.put(sched)
    for _ in senders:
        work.put(None)
    for t in senders:
        t.join()
    out_q.put((lat, errors, sum(os.times()[:2])))


def _gather(procs, q):
    """Start the client processes, collect each one's (latencies, errors, cpu seconds), join them."""
    for p in procs:
        p.start()
    lat, errors, cpu = [], [], 0.0
    for _ in procs:
        a, b, c = q.get()
        lat += a
        errors += b
        cpu += c
    for p in procs:
        p.join()
    return lat, errors, cpu


def _split(n, parts):
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def closed_loop(addr, token, payload, clients, requests_total, roots):
    """`clients` closed-loop clients sending `requests_total` requests in all (rounded up per client)."""
    nprocs = min(clients, 4)
    per_client = max(1, -(-requests_total // clients))
    q = mp.Queue()
    start_at = time.perf_counter() + 1.0     # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux
    procs = [mp.Process(target=_closed_loop_proc, args=(addr, token, payload, n, per_client, start_at, q))
             for n in _split(clients, nprocs) if n]
    cpu0 = tree_cpu(roots)
    lat, errors, client_cpu = _gather(procs, q)
    wall = time.perf_counter() - start_at
    cpu1 = tree_cpu(roots)
    out = summarize(lat, errors, wall, model="closed", clients=clients)
    out["littles_law_mean_ms"] = round(1000.0 * clients / out["throughput_rps"], 1) if out["throughput_rps"] else None
    out["cpu_ms_per_request"] = _cpu_per_request(cpu0, cpu1, client_cpu, len(lat) + len(errors))
    return out


def open_loop(addr, token, payload, rate, duration, roots, seed=1):
    """Poisson arrivals at `rate`/s for `duration` s over up to OPEN_LOOP_CONNECTIONS connections."""
    nprocs = 4
    rng = random.Random(seed)
    start_at = time.perf_counter() + 1.0
    t, arrivals = start_at, []
    while True:
        t += rng.expovariate(rate)
        if t >= start_at + duration:
            break
        arrivals.append(t)
    q = mp.Queue()
    procs = [mp.Process(target=_open_loop_proc, args=(addr, token, payload, arrivals[i::nprocs], conns, q))
             for i, conns in enumerate(_split(OPEN_LOOP_CONNECTIONS, nprocs))]
    cpu0 = tree_cpu(roots)
    lat, errors, client_cpu = _gather(procs, q)
    cpu1 = tree_cpu(roots)
    out = summarize(lat, errors, max(duration, time.perf_counter() - start_at), model="open", rate=round(rate, 1),
                    connections=OPEN_LOOP_CONNECTIONS)
    out["cpu_ms_per_request"] = _cpu_per_request(cpu0, cpu1, client_cpu, len(lat) + len(errors))
    return out


def _cpu_per_request(cpu0, cpu1, client_cpu, n):
    if not n:
        return None
    out = {k: round(1000.0 * (cpu1[k] - cpu0[k]) / n, 2) for k in cpu0}
    out["clients"] = round(1000.0 * client_cpu / n, 2)
    out["total"] = round(sum(out.values()), 2)
    return out


def summarize(lat, errors, wall, **extra):
    ms = [x * 1000 for x in lat]
    out = dict(extra)
    out.update({"requests": len(lat) + len(errors), "errors": len(errors),
                "error_kinds": sorted(set(errors))[:5],
                "p50_ms": round(pct(ms, 50), 1) if ms else None, "p90_ms": round(pct(ms, 90), 1) if ms else None,
                "p99_ms": round(pct(ms, 99), 1) if ms else None, "max_ms": round(max(ms), 1) if ms else None,
                "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
                "throughput_rps": round(len(lat) / wall, 1) if wall else None})
    return out


# --- end to end --------------------------------------------------------------------------------------------------
def bare_inference(json_path: Path, processes: int) -> dict:
    """`covidseg bench --backends int8 --processes N` (model only and whole path, batch 8; and N processes at
    once), in a subprocess at our nice level."""
    subprocess.run([sys.executable, "-m", "cli", "bench", "--backends", "int8", "--no-seed",
                    "--repeats", "3", "--processes", str(processes), "--json", str(json_path)], cwd=REPO,
                   check=True, env=localstack.service_env({}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = json.loads(json_path.read_text())
    b = res["backends"]["int8"]
    par = res.get("parallel") or {"throughput_batch8_slices_per_s": b["throughput_batch8_slices_per_s"]}
    return {"backend": b["effective_backend"], "processes": processes,
            "pool_slices_per_second_b8": round(par["throughput_batch8_slices_per_s"], 2),
            "model_slices_per_second_b8": round(b["throughput_batch8_slices_per_s"], 2),
            "model_s_per_slice_b8": round(b["per_slice_batch8_s"], 4),
            "model_cpu_s_per_slice_b8": round(b["cpu_s_per_slice_batch8"], 4),
            "whole_path_cpu_s_per_slice_b8": round(b["whole_path_cpu_s_per_slice_batch8"], 4),
            "whole_path_slices_per_second_b8": round(1.0 / b["whole_path_per_slice_batch8_s"], 2),
            "loadavg": json.loads(json_path.read_text())["machine"]["loadavg_start"]}


def _wait_done(session, url, h, job_ids, poll=0.05):
    """Poll until every job is finished; returns their final states (only unfinished jobs are polled)."""
    states = {j: None for j in job_ids}
    while True:
        for j in [j for j, st in states.items() if st not in ("succeeded", "failed", "cancelled")]:
            states[j] = session.get(f"{url}/api/v1/jobs/{j}", headers=h, timeout=30).json()["status"]
        if all(st in ("succeeded", "failed", "cancelled") for st in states.values()):
            return list(states.values())
        time.sleep(poll)


def _spans(engine, job_ids, submitted_at):
    """(submit -> last finished_at, first started_at -> last finished_at) in seconds, from the job table's
    timestamps (same clock as this process): exact, so the client can poll slowly and leave the CPU to the
    worker."""
    from sqlalchemy import func, select

    from shared.service import db
    with engine.connect() as conn:
        lo, hi = conn.execute(select(func.min(db.Job.started_at), func.max(db.Job.finished_at))
                              .where(db.Job.id.in_(job_ids))).one()
    if not (lo and hi):
        return None, None
    return (hi - submitted_at).total_seconds(), (hi - lo).total_seconds()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def end_to_end(url, token, engine, n_batch, n_burst, n_single, roots, worker_log: Path):
    import requests
    h = {"Authorization": f"Bearer {token}"}
    s = requests.Session()
    paths = sorted(SLICES.glob("*"))
    blobs = [(p.name, p.read_bytes()) for p in paths]
    out = {}

    # warm-up: each pool process's first task pays one-off costs (first ORT run, connections); a 32-slice batch
    # is 4 messages, so every process of a pool of up to 4 gets one
    r = s.post(url + "/api/v1/jobs", headers=h, files=[("file", blobs[i % len(blobs)]) for i in range(32)],
               timeout=120)
    _wait_done(s, url, h, [j["id"] for j in r.json()["jobs"]], poll=0.5)

    files = [("file", blobs[i % len(blobs)]) for i in range(n_batch)]
    cpu0 = tree_cpu(roots)
    log0 = _size(worker_log)
    submitted_at = datetime.now(timezone.utc)
    r = s.post(url + "/api/v1/jobs", headers=h, files=files, timeout=120)
    r.raise_for_status()
    ids = [j["id"] for j in r.json()["jobs"]]
    batch = r.json()["batch_id"]
    while True:
        b = s.get(f"{url}/api/v1/batches/{batch}", headers=h, timeout=30).json()
        if b["done"]:
            break
        time.sleep(1.0)     # slow on purpose: polling costs CPU the worker needs; the times come from the DB
    cpu1 = tree_cpu(roots)
    wall, span = _spans(engine, ids, submitted_at)
    out["batch"] = {"slices": n_batch, "succeeded": b["counts"]["succeeded"], "seconds": round(wall, 2),
                    "slices_per_second": round(n_batch / wall, 2),
                    "worker_span_s": round(span, 2) if span else None,
                    "worker_slices_per_second": round(n_batch / span, 2) if span else None,
                    "cpu_s_per_slice": {k: round((cpu1[k] - cpu0[k]) / n_batch, 4) for k in cpu0},
                    "worker_phases": worker_phases(worker_log, log0)}

    if n_burst:
        # n_burst single-slice jobs at once (interactive queue), as n_burst users would
        ids, lock = [], threading.Lock()

        def one(i):
            sess = requests.Session()
            j = sess.post(url + "/api/v1/jobs", headers=h, files={"file": blobs[i % len(blobs)]},
                          timeout=60).json()["jobs"][0]["id"]
            with lock:
                ids.append(j)
        log0 = _size(worker_log)
        submitted_at = datetime.now(timezone.utc)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(n_burst)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        states = _wait_done(s, url, h, ids, poll=1.0)
        wall, span = _spans(engine, ids, submitted_at)
        out["burst"] = {"slices": n_burst, "succeeded": states.count("succeeded"), "seconds": round(wall, 2),
                        "slices_per_second": round(n_burst / wall, 2),
                        "worker_span_s": round(span, 2) if span else None,
                        "worker_slices_per_second": round(n_burst / span, 2) if span else None,
                        "worker_phases": worker_phases(worker_log, log0)}

    singles = []
    for i in range(n_single):
        submitted_at = datetime.now(timezone.utc)
        jid = s.post(url + "/api/v1/jobs", headers=h, files={"file": blobs[i % len(blobs)]},
                     timeout=60).json()["jobs"][0]["id"]
        _wait_done(s, url, h, [jid], poll=0.25)
        singles.append(_spans(engine, [jid], submitted_at)[0])     # submit -> finished_at (job table)
    out["single"] = {"jobs": n_single, "latency_p50_s": round(statistics.median(singles), 3) if singles else None,
                     "latency_max_s": round(max(singles), 3) if singles else None}
    return out


_PHASES = re.compile(r"task timings: slices=(\d+) (.*)$")


def worker_phases(log_path: Path, start: int = 0, end: int | None = None) -> dict | None:
    """Sums of the worker's per-task phase timings (`task timings:` log lines) in log bytes [start, end): wall and
    CPU seconds per phase, per slice, and the share of the worker's task time spent in the model call."""
    tasks, slices, sums = 0, 0, {}
    text = Path(log_path).read_bytes()[start:end].decode("utf-8", "replace")
    for line in text.splitlines():
        m = _PHASES.search(line)
        if not m:
            continue
        tasks += 1
        slices += int(m.group(1))
        for part in m.group(2).split():
            k, _, v = part.partition("=")
            sums[k] = sums.get(k, 0.0) + float(v)
    if not tasks:
        return None
    out = {"tasks": tasks, "slices": slices, "seconds": {k: round(v, 3) for k, v in sums.items()},
           "s_per_slice": {k: round(v / slices, 4) for k, v in sums.items()}}
    if sums.get("total"):
        out["model_share_of_task_time"] = round(sums.get("infer", 0.0) / sums["total"], 3)
    return out


# --- main ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(REPO / "artifacts" / "bench_service.json"))
    ap.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--clients", default="1,10,50", help="closed-loop client counts ('' = none)")
    ap.add_argument("--requests", type=int, default=400,
                    help="requests per closed-loop level (at least 20 per client)")
    ap.add_argument("--rates", default="auto",
                    help="open-loop rates in requests/s, or 'auto' = 25,50,75 %% of the 50-client capacity")
    ap.add_argument("--duration", type=float, default=10.0, help="open-loop duration per rate (s)")
    ap.add_argument("--api-workers", type=int, default=None, help="gunicorn workers (default: the setting)")
    ap.add_argument("--api-threads", type=int, default=None, help="threads per worker (default: the setting)")
    ap.add_argument("--batch", type=int, default=96, help="slices in the end-to-end batch")
    ap.add_argument("--worker-concurrency", type=int, default=None,
                    help="the end-to-end worker's pool size (default: the setting, 2)")
    ap.add_argument("--burst", type=int, default=16, help="single-slice jobs submitted at once")
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-submit", action="store_true")
    args = ap.parse_args(argv)

    from shared.service.settings import Settings
    defaults = Settings()
    workers = args.api_workers or defaults.api_workers
    threads = args.api_threads or defaults.api_threads
    base = Path(tempfile.mkdtemp(prefix="covidseg-bench-"))
    services = localstack.DataServices(base, args.db).start()
    api = worker = engine = None
    try:
        env = dict(services.env, COVIDSEG_API_WORKERS=str(workers), COVIDSEG_API_THREADS=str(threads),
                   COVIDSEG_DB_POOL_SIZE=str(threads), COVIDSEG_LOG_LEVEL="WARNING")
        url = services.url
        token = localstack.create_token(env, "bench")
        port = localstack.free_port()
        api = localstack.start_api(env, base / "api.log", port)
        api_url = f"http://127.0.0.1:{port}"
        addr = ("127.0.0.1", port)
        payload = SLICE.read_bytes()
        roots = {"api": api.pid, **services.pids()}
        results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "nice": os.nice(0),
                               "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                               "note": "2 shared cores; other processes (e.g. a training run) may be using them"},
                   "config": {"db": args.db, "api_workers": workers, "api_threads": threads,
                              "payload_bytes": len(payload),
                              "db_note": "bench PostgreSQL runs with fsync=off, synchronous_commit=off"},
                   "load_models": {
                       "closed": "C clients, one keep-alive connection each, next request as soon as the previous "
                                 "returns (zero think time); mean latency = C / throughput (Little's law)",
                       "open": f"Poisson arrivals at a fixed rate over up to {OPEN_LOOP_CONNECTIONS} connections; "
                               "latency from the scheduled arrival (no coordinated omission)"},
                   "submit_closed_loop": [], "submit_open_loop": [], "end_to_end": None}
        if not args.skip_submit:
            # warm-up: every gunicorn thread opens its DB and S3 connections, the token cache fills
            closed_loop(addr, token, payload, 50, 200, roots)
            for c in [int(x) for x in args.clients.split(",") if x]:
                res = closed_loop(addr, token, payload, c, max(args.requests, c * 20), roots)
                results["submit_closed_loop"].append(res)
                print(f"closed loop {c:>3} clients: {res}", flush=True)
            cap = next((r["throughput_rps"] for r in results["submit_closed_loop"] if r["clients"] == 50), None)
            if args.rates == "auto":
                cap = cap or closed_loop(addr, token, payload, 50, 1000, roots)["throughput_rps"]
                rates = [round(cap * f, 1) for f in (0.25, 0.5, 0.75)]
            else:
                rates = [float(x) for x in args.rates.split(",") if x]
            for rate in rates:
                res = open_loop(addr, token, payload, rate, args.duration, roots)
                results["submit_open_loop"].append(res)
                print(f"open loop {rate:g}/s: {res}", flush=True)
        if not args.skip_e2e:
            # purge the submit-latency jobs first so the end-to-end run measures only its own slices
            import redis as redis_lib
            from sqlalchemy import update

            from shared.service import db
            redis_lib.Redis.from_url(services.redis.url).flushdb()
            engine = db.make_engine(url)
            with engine.begin() as conn:
                conn.execute(update(db.Job).where(db.Job.status.in_(db.ACTIVE)).values(status=db.CANCELLED))
            pool_size = args.worker_concurrency or defaults.worker_concurrency
            results["config"]["worker_concurrency"] = pool_size
            results["bare_inference"] = bare_inference(base / "bare.json", pool_size)
            print(f"bare inference: {results['bare_inference']}", flush=True)
            worker_log = base / "worker.log"
            worker = localstack.start_worker(dict(env, COVIDSEG_LOG_LEVEL="INFO"), worker_log,
                                             concurrency=pool_size)
            deadline = time.monotonic() + 300
            while not localstack.worker_ready(worker_log) and time.monotonic() < deadline:
                time.sleep(0.5)
            e2e = end_to_end(api_url, token, engine, args.batch, args.burst, args.singles,
                             dict(roots, worker=worker.pid), worker_log)
            localstack.stop_process(worker)
            worker = None
            # the reference again, right after: on a shared machine the load drifts within minutes, so the
            # ratio below uses the mean of the two and both are kept
            after = bare_inference(base / "bare_after.json", pool_size)
            results["bare_inference_after"] = after
            print(f"bare inference after: {after}", flush=True)
            bare = (results["bare_inference"]["model_slices_per_second_b8"] + after["model_slices_per_second_b8"]) / 2
            results["bare_model_slices_per_second_mean"] = round(bare, 2)
            pool = (results["bare_inference"]["pool_slices_per_second_b8"] + after["pool_slices_per_second_b8"]) / 2
            results["bare_pool_slices_per_second_mean"] = round(pool, 2)
            for what in ("batch", "burst"):
                if what in e2e:
                    e2e[what]["vs_bare_model"] = round(e2e[what]["slices_per_second"] / bare, 3)
                    e2e[what]["vs_bare_pool"] = round(e2e[what]["slices_per_second"] / pool, 3)
            if e2e["batch"]["worker_slices_per_second"]:
                e2e["batch"]["worker_vs_bare_model"] = round(e2e["batch"]["worker_slices_per_second"] / bare, 3)
            results["end_to_end"] = e2e
            print(f"end to end: {e2e}", flush=True)
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        localstack.stop_process(worker)
        localstack.stop_process(api)
        if engine is not None:
            engine.dispose()
        services.stop()

    print_tables(results)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


def print_tables(results):
    rows = results["submit_closed_loop"] + results["submit_open_loop"]
    if rows:
        print("\n| submit load | requests | errors | p50 ms | p99 ms | max ms | req/s | C/X ms | CPU ms/req "
              "(api, s3, db, redis, clients) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        what = (f"closed, {r['clients']} clients" if r["model"] == "closed"
                else f"open, {r['rate']:g}/s Poisson, {r['connections']} conns")
        c = r["cpu_ms_per_request"] or {}
        cpu = ", ".join(f"{c.get(k, '-')}" for k in ("api", "s3", "db", "redis", "clients"))
        print(f"| {what} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} | "
              f"{r['throughput_rps']} | {r.get('littles_law_mean_ms', '')} | {cpu} (= {c.get('total')}) |")
    e = results.get("end_to_end")
    if e:
        b, bare = e["batch"], results["bare_inference"]
        after = results.get("bare_inference_after") or bare
        n = results["config"].get("worker_concurrency", 1)
        print(f"\nbare inference (covidseg bench, int8, batch 8), before / after the end-to-end runs: "
              f"{bare['model_slices_per_second_b8']} / {after['model_slices_per_second_b8']} slices/s, mean "
              f"{results.get('bare_model_slices_per_second_mean')} (whole path {bare['whole_path_slices_per_second_b8']}"
              f" / {after['whole_path_slices_per_second_b8']} slices/s); {n} processes at once (the worker's pool "
              f"layout): {bare.get('pool_slices_per_second_b8')} / {after.get('pool_slices_per_second_b8')}, mean "
              f"{results.get('bare_pool_slices_per_second_mean')} slices/s")
        print(f"end to end, one worker ({n} processes): {b['slices']}-slice batch in {b['seconds']} s = "
              f"{b['slices_per_second']} slices/s = {b['vs_bare_model']:.0%} of bare (1 process), "
              f"{b.get('vs_bare_pool', 0):.0%} of bare ({n} processes); worker span {b['worker_span_s']} s = "
              f"{b['worker_slices_per_second']} slices/s")
        print(f"CPU s per slice during the batch: {b['cpu_s_per_slice']} (bare: model "
              f"{bare['model_cpu_s_per_slice_b8']}, whole path {bare['whole_path_cpu_s_per_slice_b8']})")
        if "burst" in e:
            u = e["burst"]
            print(f"burst of {u['slices']} single-slice jobs: {u['seconds']} s = {u['slices_per_second']} slices/s "
                  f"({u['vs_bare_model']:.0%} of bare, {u.get('vs_bare_pool', 0):.0%} of bare x {n})")
        print(f"single job submit -> succeeded: p50 {e['single']['latency_p50_s']} s, max "
              f"{e['single']['latency_max_s']} s")
        for what in ("batch", "burst"):
            ph = (e.get(what) or {}).get("worker_phases")
            if ph:
                print(f"worker phases ({what}: {ph['tasks']} tasks, {ph['slices']} slices), s per slice: "
                      f"{ph['s_per_slice']}; model call = {ph.get('model_share_of_task_time', 0):.0%} of task time")
    print(f"load average before/after: {results['machine']['loadavg_before']} / "
          f"{results['machine'].get('loadavg_after')}")


if __name__ == "__main__":
    sys.exit(main())
