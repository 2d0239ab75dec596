#!/usr/bin/env python3
"""Job-service benchmark (`make bench-service`, part of `make bench`).

Starts a throwaway stack on this machine (redis-server, SeaweedFS S3, PostgreSQL — or SQLite with --db sqlite —,
the API under gunicorn), then measures:

1. submit latency (POST /api/v1/jobs with one real CT slice, until the 202) at 1, 10 and 50 concurrent clients,
   closed loop (each client sends its next request when the previous one returned), no worker running so the
   numbers are the submit path's own;
2. the same at a fixed open-loop rate (requests are scheduled on a clock; latency counts from the scheduled time,
   so a stalled server cannot hide queueing — no coordinated omission);
3. end-to-end throughput with ONE worker: a batch of slices from submit to 100 %, and single-slice latency
   (submit -> succeeded) of interactive jobs.

Clients run in several processes (threads within each) so the client's GIL does not inflate the latencies.
Prints a table and writes JSON (--json). Benchmarks never run as timed test assertions.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import localstack  # noqa: E402

SLICE = REPO / "tests" / "fixtures" / "slices" / "covid_0300.png"


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --- client processes --------------------------------------------------------------------------------------------
def _closed_loop_proc(url, token, payload, threads, per_thread, out_q):
    import requests
    lat, errors = [], []
    lock = threading.Lock()

    def run():
        s = requests.Session()
        for _ in range(per_thread):
            t0 = time.perf_counter()
            try:
                r = s.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                           files={"file": ("slice.png", payload, "image/png")}, timeout=60)
                ok = r.status_code == 202
                err = None if ok else f"HTTP {r.status_code}"
            except Exception as exc:  # noqa: BLE001
                ok, err = False, type(exc).__name__
            dt = time.perf_counter() - t0
            with lock:
                (lat.append(dt) if ok else errors.append(err))
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out_q.put((lat, errors))


def _run_and_collect(procs, q):
    """Start the client processes, gather each one's (latencies, errors) from `q`, and join them."""
    for p in procs:
        p.start()
    lat, errors = [], []
    for _ in procs:
        a, b = q.get()
        lat += a
        errors += b
    for p in procs:
        p.join()
    return lat, errors


def closed_loop(url, token, payload, clients, requests_total):
    procs_n = min(clients, max(1, os.cpu_count() or 2) * 2, 8)
    per_client = max(1, requests_total // clients)
    q = mp.Queue()
    threads_per_proc = [clients // procs_n + (1 if i < clients % procs_n else 0) for i in range(procs_n)]
    procs = [mp.Process(target=_closed_loop_proc, args=(url, token, payload, n, per_client, q))
             for n in threads_per_proc if n]
    t0 = time.perf_counter()
    lat, errors = _run_and_collect(procs, q)
    wall = time.perf_counter() - t0
    return summarize(lat, errors, wall, clients=clients)


def _open_loop_proc(url, token, payload, rate, duration, start_at, offset, nprocs, out_q):
    import queue as _queue

    import requests
    lat, errors = [], []
    lock = threading.Lock()
    interval = nprocs / rate
    n = int(duration * rate / nprocs)
    work: _queue.Queue = _queue.Queue()

    def sender():
        s = requests.Session()
        while True:
            sched = work.get()
            if sched is None:
                return
            try:
                r = s.post(url + "/api/v1/jobs", headers={"Authorization": f"Bearer {token}"},
                           files={"file": ("slice.png", payload, "image/png")}, timeout=60)
                ok, err = r.status_code == 202, f"HTTP {r.status_code}"
            except Exception as exc:  # noqa: BLE001
                ok, err = False, type(exc).__name__
            dt = time.perf_counter() - sched       # from the scheduled send time
            with lock:
                (lat.append(dt) if ok else errors.append(err))
    senders = [threading.Thread(target=sender) for _ in range(12)]
    for t in senders:
        t.start()
    t0 = start_at + offset * interval / nprocs
    while time.perf_counter() < start_at:
        time.sleep(0.001)
    for i in range(n):
        sched = t0 + i * interval
        delay = sched - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        work.put(sched)
    for _ in senders:
        work.put(None)
    for t in senders:
        t.join()
    out_q.put((lat, errors))


def open_loop(url, token, payload, rate, duration):
    nprocs = 4
    q = mp.Queue()
    start_at = time.perf_counter() + 1.0     # perf_counter is system-wide (CLOCK_MONOTONIC) on Linux
    procs = [mp.Process(target=_open_loop_proc, args=(url, token, payload, rate, duration, start_at, i, nprocs, q))
             for i in range(nprocs)]
    lat, errors = _run_and_collect(procs, q)
    return summarize(lat, errors, duration, rate=rate)


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
def end_to_end(url, token, n_batch, n_single):
    import requests
    h = {"Authorization": f"Bearer {token}"}
    payload = SLICE.read_bytes()
    paths = sorted((REPO / "tests" / "fixtures" / "slices").glob("*"))
    files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in
             (paths[i % len(paths)] for i in range(n_batch))]
    t0 = time.perf_counter()
    r = requests.post(url + "/api/v1/jobs", headers=h, files=files, timeout=120)
    r.raise_for_status()
    batch = r.json()["batch_id"]
    while True:
        b = requests.get(f"{url}/api/v1/batches/{batch}", headers=h, timeout=30).json()
        if b["done"]:
            break
        time.sleep(0.2)
    batch_s = time.perf_counter() - t0
    singles = []
    for _ in range(n_single):
        t1 = time.perf_counter()
        jid = requests.post(url + "/api/v1/jobs", headers=h, files={"file": ("s.png", payload)},
                            timeout=60).json()["jobs"][0]["id"]
        while requests.get(f"{url}/api/v1/jobs/{jid}", headers=h, timeout=30).json()["status"] not in (
                "succeeded", "failed"):
            time.sleep(0.05)
        singles.append(time.perf_counter() - t1)
    return {"batch_slices": n_batch, "batch_seconds": round(batch_s, 2),
            "slices_per_second": round(n_batch / batch_s, 2), "batch_succeeded": b["counts"]["succeeded"],
            "single_job_latency_p50_s": round(statistics.median(singles), 2) if singles else None,
            "single_job_latency_max_s": round(max(singles), 2) if singles else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(REPO / "artifacts" / "bench_service.json"))
    ap.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--clients", default="1,10,50")
    ap.add_argument("--requests", type=int, default=400, help="requests per closed-loop level")
    ap.add_argument("--rate", type=float, default=40.0, help="open-loop rate (requests/s)")
    ap.add_argument("--duration", type=float, default=10.0, help="open-loop duration (s)")
    ap.add_argument("--api-workers", type=int, default=3)
    ap.add_argument("--api-threads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="slices in the end-to-end batch")
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="covidseg-bench-"))
    redis = localstack.RedisServer(base / "redis").start()
    weed = localstack.SeaweedS3(base / "weed", "bench", "bench-secret-key").start()
    pg = None
    api = worker = None
    try:
        if args.db == "postgresql":
            pg = localstack.Postgres().start()
            url = pg.create_database("bench")
        else:
            url = f"sqlite:///{base / 'bench.db'}"
        env = {"COVIDSEG_DATABASE_URL": url, "COVIDSEG_BROKER_URL": redis.url,
               "COVIDSEG_S3_ENDPOINT": weed.endpoint, "COVIDSEG_S3_ACCESS_KEY": "bench",
               "COVIDSEG_S3_SECRET_KEY": "bench-secret-key", "COVIDSEG_S3_BUCKET": "bench",
               "COVIDSEG_API_WORKERS": str(args.api_workers), "COVIDSEG_API_THREADS": str(args.api_threads),
               "COVIDSEG_DB_POOL_SIZE": str(args.api_threads), "COVIDSEG_LOG_LEVEL": "WARNING"}
        localstack.migrate(url)
        localstack.ensure_bucket(env)
        token = localstack.create_token(env, "bench")
        port = localstack.free_port()
        api = localstack.start_api(env, base / "api.log", port)
        api_url = f"http://127.0.0.1:{port}"
        payload = SLICE.read_bytes()
        results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                               "note": "2 shared cores; other processes (e.g. a training run) may be using them"},
                   "config": {"db": args.db, "api_workers": args.api_workers, "api_threads": args.api_threads,
                              "payload_bytes": len(payload)},
                   "submit_closed_loop": [], "submit_open_loop": None, "end_to_end": None}
        closed_loop(api_url, token, payload, 4, 40)     # warm-up: connections, pools, token cache
        for c in [int(x) for x in args.clients.split(",")]:
            res = closed_loop(api_url, token, payload, c, max(args.requests, c * 4))
            results["submit_closed_loop"].append(res)
            print(f"closed loop {c:>3} clients: {res}", flush=True)
        results["submit_open_loop"] = open_loop(api_url, token, payload, args.rate, args.duration)
        print(f"open loop {args.rate:g}/s: {results['submit_open_loop']}", flush=True)
        if not args.skip_e2e:
            worker_log = base / "worker.log"
            worker = localstack.start_worker(env, worker_log)
            deadline = time.monotonic() + 300
            while not localstack.worker_ready(worker_log) and time.monotonic() < deadline:
                time.sleep(0.5)
            # purge the submit-latency jobs first so the end-to-end run measures only its own slices
            import redis as redis_lib
            redis_lib.Redis.from_url(redis.url).flushdb()
            from sqlalchemy import update

            from shared import db
            eng = db.make_engine(url)
            with eng.begin() as conn:
                conn.execute(update(db.Job).where(db.Job.status.in_(db.ACTIVE)).values(status=db.CANCELLED))
            eng.dispose()
            results["end_to_end"] = end_to_end(api_url, token, args.batch, args.singles)
            print(f"end to end: {results['end_to_end']}", flush=True)
        results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        localstack.stop_process(worker)
        localstack.stop_process(api)
        weed.stop()
        redis.stop()
        if pg:
            pg.destroy()

    print("\n| submit (closed loop) | requests | errors | p50 ms | p99 ms | max ms | req/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results["submit_closed_loop"]:
        print(f"| {r['clients']} clients | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['max_ms']} | {r['throughput_rps']} |")
    o = results["submit_open_loop"]
    print(f"| open loop {o['rate']:g}/s | {o['requests']} | {o['errors']} | {o['p50_ms']} | {o['p99_ms']} | "
          f"{o['max_ms']} | {o['throughput_rps']} |")
    if results["end_to_end"]:
        e = results["end_to_end"]
        print(f"\nend to end, one worker: {e['batch_slices']} slices in {e['batch_seconds']} s = "
              f"{e['slices_per_second']} slices/s; single job submit->succeeded p50 {e['single_job_latency_p50_s']} s")
    print(f"load average before/after: {results['machine']['loadavg_before']} / "
          f"{results['machine']['loadavg_after']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
