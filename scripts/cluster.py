#!/usr/bin/env python3
"""Several hosts on one machine (`make cluster`): Linux network namespaces joined by veth links to one bridge,
each component reachable only at its namespace's address, then one worker host cut off mid-batch.

    python scripts/cluster.py run   [--workers 2] [--slices 64] [--cut link|freeze] [--json artifacts/cluster.json]
    python scripts/cluster.py scale [--hosts 1,2,3] [--slices 96] [--json artifacts/cluster_scale.json]
    python scripts/cluster.py cleanup [--tag T | --stale]     # namespaces + processes of a run killed with -9

Topology (run as root; iproute2). A "switch" namespace holds the bridge br0 and one veth end per host; the other
end is `eth0` of the host's namespace, with an address of NET/24. No namespace has a default route, no NAT, no
link to the machine's own network: traffic can only go to loopback or to these namespaces.

    csc-<tag>-svc  NET.1   Redis (:6379), SeaweedFS S3 (:8333), PostgreSQL (:5432), run by `_services`
    csc-<tag>-api  NET.2   two gunicorn replicas (:8000, :8001); the client round-robins between them
    csc-<tag>-cl   NET.3   the client (`_drive`): submits, cuts, checks the job rows and the bucket
    csc-<tag>-wN   NET.1N  one Celery worker each (both queues, a pool of COVIDSEG_WORKER_CONCURRENCY = 1)

`run` (the cut-off): bulk batches (several POSTs) and small NIfTI studies are submitted; once jobs run on every
worker host, one host is cut off (`--cut link`: its veth end in the switch is set down, a pulled cable; `--cut
freeze`: SIGSTOP of its processes). Its leased jobs go stale (no heartbeat for COVIDSEG_STALE_AFTER), a surviving
worker's sweep re-queues them and they finish there. Once everything has finished, the job rows and the result
objects (ETag, last-modified, versions) are recorded, the host is let back (link up / SIGCONT), and after it has
settled they are compared again: the cut host's late attempt must change nothing. A table is printed and JSON
written: jobs submitted, finished per host (the rows' `worker` column), redelivered (attempts > 1), duplicates,
lost.

`scale`: the same cluster with 1, 2, 3 worker hosts on this machine's cores: a warm-up batch, then a measured
batch; slices/s, jobs per host and per-job overhead (the workers' `task timings:` lines) per host count.

Cleanup: every process runs inside one of the run's namespaces; at the end (also on error or Ctrl-C) each is
stopped (SIGTERM, then SIGKILL of whatever `ip netns pids` still lists) and every namespace is deleted (its veth
goes with it). A state file under /tmp/covidseg-cluster-<tag>/ names the supervisor, so `cleanup --stale` (run
at every start) removes what a killed run left behind, and only that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
import localstack  # noqa: E402

NET = "10.231.0"            # a /24 that exists only on the bridge inside the run's switch namespace
PREFIX = "csc-"             # namespace names: csc-<tag>-<role>
STATE_ROOT = Path(tempfile.gettempdir())
SLICES = REPO / "tests" / "fixtures" / "slices"
ACCESS_KEY, SECRET_KEY, BUCKET = "cluster", "cluster-secret-key", "covidseg-cluster"
PORTS = {"redis": 6379, "s3": 8333, "pg": 5432, "api": (8000, 8001)}
TERMINAL = ("succeeded", "failed", "cancelled")


# --- network namespaces -----------------------------------------------------------------------------------------
def sh(*args, check=True, capture=True):
    return subprocess.run([str(a) for a in args], check=check, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)


def namespaces_supported() -> tuple[bool, str]:
    """(True, "") when this process can make network namespaces with veth links, else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root (ip netns add)"
    if not shutil.which("ip"):
        return False, "iproute2 `ip` not found"
    probe = f"{PREFIX}probe{os.getpid()}"
    try:
        r = sh("ip", "netns", "add", probe, check=False)
        if r.returncode != 0:
            return False, f"ip netns add not permitted: {r.stderr.strip()}"
        r = sh("ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb", check=False)
        if r.returncode != 0:
            return False, f"cannot create veth pairs: {r.stderr.strip()}"
        return True, ""
    finally:
        sh("ip", "netns", "del", probe, check=False)


class Net:
    """The run's namespaces: a switch (bridge br0) and one host namespace per role, each with `eth0` at
    NET.<n>/24 wired to a port `p-<role>` of the bridge."""

    def __init__(self, tag: str, roles: dict[str, int]):
        self.tag, self.roles = tag, dict(roles)
        self.switch = f"{PREFIX}{tag}-sw"
        self.created: list[str] = []

    def ns(self, role: str) -> str:
        return f"{PREFIX}{self.tag}-{role}"

    def addr(self, role: str) -> str:
        return f"{NET}.{self.roles[role]}"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def create(self) -> "Net":
        self._add_ns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for role in self.roles:
            name = self.ns(role)
            self._add_ns(name)
            port = f"p-{role}"
            sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", port, "up")
            sh("ip", "-n", name, "addr", "add", f"{self.addr(role)}/24", "dev", "eth0")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        return self

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def cut(self, role: str) -> None:
        """Pull the cable: the host's port on the switch goes down (its eth0 loses carrier, packets vanish)."""
        sh("ip", "-n", self.switch, "link", "set", f"p-{role}", "down")

    def restore(self, role: str) -> None:
        sh("ip", "-n", self.switch, "link", "set", f"p-{role}", "up")

    def pids(self) -> list[int]:
        return namespace_pids(self.created)

    def destroy(self) -> dict:
        return destroy_namespaces(self.created)


def namespace_pids(names) -> list[int]:
    out = []
    for name in names:
        r = sh("ip", "netns", "pids", name, check=False)
        out += [int(p) for p in r.stdout.split() if p.isdigit()] if r.returncode == 0 else []
    return sorted(set(out) - {os.getpid()})


def destroy_namespaces(names, grace: float = 15.0) -> dict:
    """SIGCONT + SIGTERM every process still inside the namespaces, SIGKILL after `grace` s, then delete them
    (a veth goes with its namespace). Returns {"killed": n, "deleted": [...]}."""
    names = list(names)
    pids = namespace_pids(names)
    killed = 0
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and namespace_pids(names):
        time.sleep(0.2)
    for pid in namespace_pids(names):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and namespace_pids(names):
        time.sleep(0.1)
    deleted = []
    for name in reversed(names):
        if sh("ip", "netns", "del", name, check=False).returncode == 0:
            deleted.append(name)
    return {"terminated": len(pids), "killed": killed, "deleted": deleted}


def run_namespaces(tag: str) -> list[str]:
    r = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(f"{PREFIX}{tag}-")]


def cleanup(tag: str | None = None, stale: bool = False) -> list[str]:
    """Remove the namespaces (and their processes) of run `tag`, or of every run whose supervisor is dead."""
    tags = [tag] if tag else []
    if stale:
        for d in STATE_ROOT.glob("covidseg-cluster-*"):
            try:
                st = json.loads((d / "state.json").read_text())
            except (OSError, ValueError):
                continue
            if not localstack._pid_alive(int(st.get("supervisor", 0))):
                tags.append(st["tag"])
    removed = []
    for t in tags:
        names = run_namespaces(t)
        if names:
            removed += destroy_namespaces(sorted(names, key=lambda n: n.endswith("-sw")))["deleted"]
        state_dir = STATE_ROOT / f"covidseg-cluster-{t}"
        try:
            st = json.loads((state_dir / "state.json").read_text())
            if st.get("pg_dir"):
                shutil.rmtree(st["pg_dir"], ignore_errors=True)
        except (OSError, ValueError):
            pass
        shutil.rmtree(state_dir, ignore_errors=True)   # its data and logs
    return removed


# --- the services host (runs inside its namespace) --------------------------------------------------------------
def cmd_services(args) -> int:
    """Redis, SeaweedFS and PostgreSQL bound to this namespace's address; migrated DB, bucket, a token. Writes
    `--state` when ready; stops everything when stdin closes (the supervisor ended) or on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    base, addr = Path(args.dir), args.addr
    redis = weed = pg = None
    try:
        redis = localstack.RedisServer(base / "redis", port=PORTS["redis"], host=addr).start()
        weed = localstack.SeaweedS3(base / "weed", ACCESS_KEY, SECRET_KEY, port=PORTS["s3"], host=addr).start()
        pg = localstack.Postgres(port=PORTS["pg"], host=addr, trust_cidr=f"{NET}.0/24").start()
        url = pg.create_database("covidseg")
        env = {"COVIDSEG_DATABASE_URL": url, "COVIDSEG_BROKER_URL": redis.url, "COVIDSEG_S3_ENDPOINT": weed.endpoint,
               "COVIDSEG_S3_ACCESS_KEY": ACCESS_KEY, "COVIDSEG_S3_SECRET_KEY": SECRET_KEY,
               "COVIDSEG_S3_BUCKET": BUCKET}
        localstack.migrate(url)
        localstack.ensure_bucket(env)
        versioning = _enable_versioning(env)
        token = localstack.create_token(env, "cluster")
        tmp = Path(args.state).with_suffix(".tmp")
        tmp.write_text(json.dumps({"env": env, "token": token, "pg_dir": str(pg.dir), "versioning": versioning,
                                   "redis_pid": redis.pid(), "weed_pid": weed.proc.pid}))
        tmp.replace(args.state)
        sys.stdin.buffer.read()        # EOF: the supervisor is done (or dead)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for stop in (lambda: weed and weed.stop(), lambda: redis and redis.stop(), lambda: pg and pg.destroy()):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                print(f"warning: {exc}", file=sys.stderr, flush=True)


def _enable_versioning(env) -> bool:
    """Bucket versioning on, when the S3 server supports it: an overwrite then leaves a second version."""
    from minio.commonconfig import ENABLED
    from minio.versioningconfig import VersioningConfig

    from shared.service.settings import Settings
    from shared.service.storage import Storage
    st = Storage.from_settings(Settings.from_env(env))
    try:
        st.client.set_bucket_versioning(st.bucket, VersioningConfig(ENABLED))
        return st.client.get_bucket_versioning(st.bucket).status == ENABLED
    except Exception:  # noqa: BLE001 - not supported: ETag + last-modified are compared instead
        return False


# --- the supervisor (root namespace: makes namespaces, starts and stops processes, never opens a socket) ----------
def cluster_env(services_env: dict, args) -> dict:
    env = dict(services_env)
    env.update({
        # short lease periods (as tests/conftest.py): a lost host's jobs are re-queued ~6-8 s after its last beat
        "COVIDSEG_HEARTBEAT_INTERVAL": "1", "COVIDSEG_STALE_AFTER": "6", "COVIDSEG_SWEEP_INTERVAL": "2",
        "COVIDSEG_DISPATCH_GRACE": "4", "COVIDSEG_TASK_SOFT_TIME_LIMIT": "240", "COVIDSEG_TASK_TIME_LIMIT": "300",
        "COVIDSEG_BROKER_VISIBILITY_TIMEOUT": "900", "COVIDSEG_S3_TIMEOUT": str(args.s3_timeout),
        "COVIDSEG_WORKER_CONCURRENCY": "1", "COVIDSEG_INFERENCE_BACKEND": args.backend,
        "COVIDSEG_INFER_BATCH_SIZE": "8", "COVIDSEG_TF_THREADS": "2", "COVIDSEG_API_WORKERS": "1",
        "COVIDSEG_API_THREADS": "8", "COVIDSEG_LOG_LEVEL": "INFO", "COVIDSEG_TOKEN_CACHE_SECONDS": "5",
        "COVIDSEG_MAX_FILES_PER_REQUEST": "100",
    })
    if os.environ.get("COVIDSEG_CACHE_DIR"):   # one INT8 build shared by every worker host
        env["COVIDSEG_CACHE_DIR"] = os.environ["COVIDSEG_CACHE_DIR"]
    return env


class Supervisor:
    def __init__(self, args, n_workers: int):
        self.args = args
        self.tag = args.tag or secrets.token_hex(3)
        roles = {"svc": 1, "api": 2, "cl": 3}
        roles.update({f"w{i}": 10 + i for i in range(1, n_workers + 1)})
        self.workers = [f"w{i}" for i in range(1, n_workers + 1)]
        self.net = Net(self.tag, roles)
        self.dir = STATE_ROOT / f"covidseg-cluster-{self.tag}"
        self.services = None
        self.state: dict = {}
        self.env: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle --
    def __enter__(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_state()
        try:
            self.net.create()
        except BaseException:
            self.net.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.stop_all()
        report = self.net.destroy()
        if self.state.get("pg_dir"):
            shutil.rmtree(self.state["pg_dir"], ignore_errors=True)
        left = run_namespaces(self.tag)
        print(f"teardown: {len(report['deleted'])} namespaces deleted ({report['terminated']} processes were "
              f"still inside, {report['killed']} needed SIGKILL); left: {left or 'none'}", flush=True)
        self.teardown = {**report, "left": left}
        if not self.args.keep and not any(exc):
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            (self.dir / "state.json").unlink(missing_ok=True)
        return False

    def _write_state(self, **extra):
        data = {"supervisor": os.getpid(), "tag": self.tag, **extra}
        (self.dir / "state.json").write_text(json.dumps(data))

    def _popen(self, role: str, cmd: list[str], log: Path, env: dict, nice: int = 0, stdin=subprocess.DEVNULL):
        full = self.net.exec_prefix(role) + (["nice", "-n", str(nice)] if nice else []) + cmd
        with open(log, "ab") as f:
            return subprocess.Popen(full, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=stdin,
                                    start_new_session=True)

    def start_services(self):
        state_file = self.dir / "services.json"
        proc = self._popen("svc", [sys.executable, str(Path(__file__).resolve()), "_services", "--addr",
                                   self.net.addr("svc"), "--dir", str(self.dir / "svc"), "--state", str(state_file)],
                           self.dir / "services.log", localstack.service_env({}), stdin=subprocess.PIPE)
        self.procs["services"] = proc
        deadline = time.monotonic() + 180
        while not state_file.exists():
            _alive_or_raise(proc, self.dir / "services.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"services host not ready after 180 s; see {self.dir / 'services.log'}")
            time.sleep(0.3)
        self.state = json.loads(state_file.read_text())
        self._write_state(pg_dir=self.state["pg_dir"])
        self.env = cluster_env(self.state["env"], self.args)

    def worker_log(self, role: str) -> Path:
        return self.dir / f"worker-{role}.log"

    def start_worker(self, role: str):
        cmd = [sys.executable, "-m", "celery", "-A", "shared.service.celery_app", "worker", "--pool", "prefork",
               "-Q", "covidseg.interactive,covidseg.bulk", "-n", f"cluster-{role}@%h", "--without-gossip",
               "--without-mingle", "--loglevel", "INFO"]
        log = self.worker_log(role)
        offset = log.stat().st_size if log.exists() else 0
        self.procs[role] = self._popen(role, cmd, log, localstack.service_env(self.env), nice=self.args.nice)
        return offset

    def wait_workers(self, offsets: dict[str, int], timeout: float = 600):
        deadline = time.monotonic() + timeout
        while not all(localstack.worker_ready(self.worker_log(r), off) for r, off in offsets.items()):
            for role in offsets:
                _alive_or_raise(self.procs[role], self.worker_log(role))
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker hosts not ready after {timeout:.0f} s; logs in {self.dir}")
            time.sleep(0.5)

    def start_apis(self):
        for i, port in enumerate(PORTS["api"]):
            env = localstack.service_env(self.env, {"COVIDSEG_API_BIND": f"{self.net.addr('api')}:{port}"})
            self.procs[f"api{i + 1}"] = self._popen(
                "api", [sys.executable, "-m", "gunicorn", "-c", str(REPO / "api" / "gunicorn_conf.py"), "api.wsgi:app"],
                self.dir / f"api{i + 1}.log", env, nice=self.args.nice)

    def api_urls(self) -> list[str]:
        return [f"http://{self.net.addr('api')}:{p}" for p in PORTS["api"]]

    def stop_proc(self, name: str, timeout: float = 30):
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGCONT)   # a frozen host must be able to act on SIGTERM
        except ProcessLookupError:
            return
        if name == "services":
            try:
                proc.stdin.close()                # EOF: stops its services in order
            except OSError:
                pass
            try:
                proc.wait(60)
                return
            except subprocess.TimeoutExpired:
                pass
        localstack.stop_process(proc, signal.SIGTERM, timeout=timeout)

    def stop_all(self):
        for name in [n for n in self.procs if n != "services"] + ["services"]:
            try:
                self.stop_proc(name)
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                print(f"warning: stopping {name}: {exc}", file=sys.stderr, flush=True)

    def drive(self, mode: str, plan_extra: dict, timeout: float) -> dict:
        """Run the client inside the client namespace; returns its JSON result."""
        plan = {"mode": mode, "env": self.env, "token": self.state["token"], "apis": self.api_urls(),
                "switch": self.net.switch, "versioning": self.state.get("versioning", False),
                "workers": {r: {"log": str(self.worker_log(r)), "pgid": self.procs[r].pid}
                            for r in self.workers if r in self.procs}, **plan_extra}
        plan_file = self.dir / f"plan-{mode}.json"
        out_file = self.dir / f"result-{mode}.json"
        out_file.unlink(missing_ok=True)
        plan_file.write_text(json.dumps(plan))
        cmd = [sys.executable, str(Path(__file__).resolve()), "_drive", "--plan", str(plan_file), "--out",
               str(out_file)]
        proc = subprocess.Popen(self.net.exec_prefix("cl") + cmd, cwd=REPO, env=localstack.service_env(self.env),
                                start_new_session=True)
        self.procs["driver"] = proc
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"client did not finish within {timeout:.0f} s") from None
        finally:
            self.stop_proc("driver")
        if rc != 0 or not out_file.exists():
            raise RuntimeError(f"client failed (exit {rc}); logs in {self.dir}")
        return json.loads(out_file.read_text())


def _alive_or_raise(proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
        raise RuntimeError(f"{log.name}: process exited with {proc.returncode}\n" + "\n".join(tail))
    return True


def _install_signal_handlers():
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load] if load else None,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _ready_to_run() -> bool:
    """Namespaces can be made here; signals tear the cluster down; stale clusters of killed runs are removed."""
    ok, why = namespaces_supported()
    if not ok:
        print(f"cannot run: {why}", file=sys.stderr)
        return False
    _install_signal_handlers()
    cleanup(stale=True)
    return True


def cmd_run(args) -> int:
    if not _ready_to_run():
        return 3
    t0 = time.monotonic()
    result = {"machine": _machine()}
    sup = Supervisor(args, args.workers)
    try:
        with sup:
            print(f"cluster {sup.tag}: namespaces {', '.join(sup.net.created)}", flush=True)
            sup.start_services()
            offsets = {r: sup.start_worker(r) for r in sup.workers}
            sup.start_apis()
            sup.wait_workers(offsets)
            print(f"up in {time.monotonic() - t0:.0f} s: services at {sup.net.addr('svc')}, API replicas "
                  f"{', '.join(sup.api_urls())}, workers {', '.join(sup.workers)}", flush=True)
            result.update(sup.drive("cutoff", {
                "slices": args.slices, "posts": args.posts, "studies": args.studies,
                "study_slices": args.study_slices, "cut": args.cut, "cut_host": args.cut_host,
                "min_cut_seconds": args.min_cut_seconds, "settle_timeout": args.settle_timeout,
                "settle_min": args.settle_min, "probe_slices": args.probe_slices,
                "cut_after_done": args.cut_after_done,
                "done_timeout": args.done_timeout}, timeout=args.done_timeout + args.settle_timeout + 300))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    result["teardown"] = getattr(sup, "teardown", None)
    result["seconds_total"] = round(time.monotonic() - t0, 1)
    result["topology"] = {"namespaces": sup.net.created, "addresses": {r: sup.net.addr(r) for r in sup.net.roles},
                          "api_replicas": sup.api_urls(), "network": f"{NET}.0/24 (bridge in {sup.net.switch})"}
    print_cutoff(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0 if result["summary"]["ok"] else 1


def cmd_scale(args) -> int:
    if not _ready_to_run():
        return 3
    hosts = [int(x) for x in args.hosts.split(",")]
    t0 = time.monotonic()
    result = {"machine": _machine(), "slices": args.slices, "rounds": args.rounds, "backend": args.backend,
              "runs": []}
    sup = Supervisor(args, max(hosts))
    try:
        with sup:
            sup.start_services()
            sup.start_apis()
            for n in hosts:
                roles = sup.workers[:n]
                offsets = {r: sup.start_worker(r) for r in roles}
                sup.wait_workers(offsets)
                print(f"{n} worker host(s) ready", flush=True)
                sub = sup.drive("throughput", {"slices": args.slices, "rounds": args.rounds, "hosts": roles,
                                               "log_offsets": {r: sup.worker_log(r).stat().st_size
                                                               for r in roles}},
                                timeout=1800)
                sub["worker_hosts"] = n
                sub["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
                result["runs"].append(sub)
                for r in roles:
                    sup.stop_proc(r, timeout=60)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    result["teardown"] = getattr(sup, "teardown", None)
    result["seconds_total"] = round(time.monotonic() - t0, 1)
    print_scale(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


# --- the client (runs inside the client namespace) -----------------------------------------------------------------
class Client:
    """HTTP to the API replicas (round robin), plus direct reads of the job database and the bucket (checks)."""

    def __init__(self, plan: dict):
        import requests

        from shared.service import db
        from shared.service.settings import Settings
        from shared.service.storage import Storage
        self.plan = plan
        self.apis = plan["apis"]
        self.rr = 0
        self.http = requests.Session()
        self.h = {"Authorization": f"Bearer {plan['token']}"}
        self.settings = Settings.from_env(plan["env"])
        self.engine = db.make_engine(self.settings)
        self.storage = Storage.from_settings(self.settings)
        self.calls: dict[str, int] = {u: 0 for u in self.apis}

    def url(self) -> str:
        u = self.apis[self.rr % len(self.apis)]
        self.rr += 1
        self.calls[u] += 1
        return u

    def get(self, path):
        r = self.http.get(self.url() + path, headers=self.h, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path, files, data=None):
        r = self.http.post(self.url() + path, headers=self.h, files=files, data=data or {}, timeout=120)
        if r.status_code != 202:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:300]}")
        return r.json()

    def wait_healthy(self, timeout=120):
        import requests
        for u in self.apis:
            localstack.wait_for(lambda: requests.get(u + "/healthz", timeout=2).status_code == 200, timeout,
                                f"API {u}", interval=0.3)

    # -- submission --
    def submit_batches(self, n_slices: int, n_posts: int) -> tuple[list[str], list[str]]:
        blobs = [(p.name, p.read_bytes()) for p in sorted(SLICES.glob("*.png"))]
        jobs, batches = [], []
        per = [n_slices // n_posts + (1 if i < n_slices % n_posts else 0) for i in range(n_posts)]
        k = 0
        for n in per:
            files = [("file", (f"{k + i:03d}-{blobs[(k + i) % len(blobs)][0]}", blobs[(k + i) % len(blobs)][1],
                               "image/png")) for i in range(n)]
            k += n
            body = self.post("/api/v1/jobs", files)
            jobs += [j["id"] for j in body["jobs"]]
            batches.append(body["batch_id"])
        return jobs, batches

    def submit_studies(self, n: int, n_slices: int) -> list[str]:
        payload = nifti_volume(n_slices)
        return [self.post("/api/v1/studies", [("file", (f"volume{i}.nii.gz", payload, "application/gzip"))])["id"]
                for i in range(n)]

    # -- the database --
    def rows(self, job_ids, study_ids) -> dict:
        from sqlalchemy import select

        from shared.service import db
        cols = ("status", "worker", "attempts", "finished_at", "claim_token", "result_checksums")
        out = {}
        with self.engine.connect() as conn:
            for model, ids in ((db.Job, job_ids), (db.Study, study_ids)):
                if not ids:
                    continue
                q = select(model.id, *[getattr(model, c) for c in cols]).where(model.id.in_(list(ids)))
                for row in conn.execute(q):
                    out[row[0]] = {c: (v.isoformat() if hasattr(v, "isoformat") else v)
                                   for c, v in zip(cols, row[1:])}
        return out

    def running(self) -> dict[str, list[str]]:
        """host -> ids of its running jobs and studies (from the `worker` column: cluster-<host>@...)."""
        from sqlalchemy import select

        from shared.service import db
        out: dict[str, list[str]] = {}
        with self.engine.connect() as conn:
            for model in (db.Job, db.Study):
                for rid, worker in conn.execute(select(model.id, model.worker).where(model.status == db.RUNNING)):
                    out.setdefault(host_of(worker), []).append(rid)
        return out

    def done_per_host(self, job_ids) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows(job_ids, []).values():
            if r["status"] == "succeeded":
                out[host_of(r["worker"])] = out.get(host_of(r["worker"]), 0) + 1
        return out

    # -- the bucket --
    def objects(self, job_ids, study_ids) -> dict:
        """key -> {etag, last_modified, size, version_id, versions: [(version_id, etag, last_modified), ...]} for
        every object under the results of these jobs and studies (every version when the bucket keeps them)."""
        from shared.service.storage import result_prefix, study_results_prefix
        out = {}
        versioned = bool(self.plan.get("versioning"))
        for prefix in ["results/"] + [study_results_prefix(s) for s in study_ids]:
            for o in self.storage.client.list_objects(self.storage.bucket, prefix=prefix, recursive=True,
                                                      include_version=versioned):
                if getattr(o, "is_delete_marker", False):
                    continue
                e = out.setdefault(o.object_name, {"versions": []})
                lm = o.last_modified.isoformat() if o.last_modified else None
                e["versions"].append([o.version_id, o.etag, lm])
                if not versioned or str(getattr(o, "is_latest", "true")).lower() == "true":
                    e.update(etag=o.etag, last_modified=lm, size=o.size, version_id=o.version_id)
        for e in out.values():
            e["versions"].sort(key=lambda v: v[2] or "")
        wanted = {result_prefix(j) for j in job_ids}
        return {k: v for k, v in out.items()
                if not k.startswith("results/") or any(k.startswith(p) for p in wanted)}

    def check_checksums(self, rows: dict, job_ids) -> list[str]:
        """Jobs whose stored result objects do not hash to the checksums their row records."""
        from shared.service.storage import result_key, sha256_hex
        bad = []
        for j in job_ids:
            sums = json.loads(rows[j]["result_checksums"] or "{}")
            for kind, sha in sums.items():
                if sha256_hex(self.storage.get_bytes(result_key(j, kind))) != sha:
                    bad.append(j)
                    break
        return bad

    def redis(self):
        import redis
        return redis.Redis.from_url(self.settings.broker_url, socket_timeout=5)

    def broker_state(self) -> dict:
        r = self.redis()
        return {"unacked": r.hlen("unacked"), "queued": {q: r.llen(q) for q in self.settings.queues}}

    def service_counters(self) -> dict:
        """Counters of the data services (Redis commands, PostgreSQL row writes, bucket objects) for per-job
        costs."""
        from sqlalchemy import text
        info = self.redis().info("commandstats")
        redis_calls = {k.replace("cmdstat_", ""): v["calls"] for k, v in info.items()}
        with self.engine.connect() as conn:
            pg = {r[0]: {"ins": r[1], "upd": r[2], "del": r[3]} for r in conn.execute(text(
                "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"))}
            xact = conn.execute(text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
                                     )).scalar()
            conns = {str(a): n for a, n in conn.execute(text(
                "SELECT client_addr, count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "GROUP BY client_addr"))}
            jobs_bytes, jobs_rows = conn.execute(text(
                "SELECT pg_total_relation_size('jobs'), (SELECT count(*) FROM jobs)")).one()
        n, size = 0, 0
        for o in self.storage.client.list_objects(self.storage.bucket, recursive=True):
            n += 1
            size += o.size or 0
        return {"redis_calls": redis_calls, "pg_tables": pg, "pg_commits": xact, "objects": n, "bytes": size,
                "pg_connections_by_addr": conns, "jobs_table_bytes": jobs_bytes, "jobs_rows": jobs_rows,
                "redis_used_memory": self.redis().info("memory").get("used_memory")}


def host_of(worker: str | None) -> str:
    m = re.match(r"cluster-([^@]+)@", worker or "")
    return m.group(1) if m else (worker or "?")


def nifti_volume(n: int) -> bytes:
    """A .nii.gz CT volume (256 x 256 x n) of HU made from the fixture slices (as tests/service/test_studies.py)."""
    import gzip

    import cv2
    import nibabel as nib
    import numpy as np
    paths = sorted(SLICES.glob("covid_*.png"))
    hu = [cv2.imread(str(paths[k % len(paths)]), cv2.IMREAD_GRAYSCALE).astype(np.float32) * (1500.0 / 255.0)
          - 1350.0 for k in range(n)]
    vol = np.stack([np.round(h) for h in hu], axis=-1).transpose(1, 0, 2).astype(np.int16)
    affine = np.array([[-0.75, 0, 0, 95.0], [0, -0.75, 0, 110.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _set_cut(plan: dict, host: str, cut: bool) -> None:
    """Cut a worker host off (link down, or its worker frozen with SIGSTOP) or restore it."""
    if plan["cut"] == "link":
        subprocess.run(["ip", "-n", plan["switch"], "link", "set", f"p-{host}", "down" if cut else "up"], check=True)
    else:
        os.killpg(plan["workers"][host]["pgid"], signal.SIGSTOP if cut else signal.SIGCONT)


def _log_size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _log_since(path, offset: int) -> str:
    try:
        return Path(path).read_bytes()[offset:].decode("utf-8", "replace")
    except OSError:
        return ""


_TASK_LINE = re.compile(r"Task (covidseg\.\w+)\[([0-9a-f-]+)\] (received|succeeded in [0-9.]+s: .*|retry: .*|"
                        r"raised .*|reject.*)$", re.M)


def tasks_in_progress(text: str) -> list[str]:
    """Celery task ids received but not yet ended (succeeded, retry, raised, rejected) in a worker log."""
    open_: dict[str, int] = {}
    for m in _TASK_LINE.finditer(text):
        open_[m.group(2)] = open_.get(m.group(2), 0) + (1 if m.group(3) == "received" else -1)
    return [t for t, n in open_.items() if n > 0]


def drive_cutoff(plan: dict) -> dict:
    c = Client(plan)
    c.wait_healthy()
    counters0 = c.service_counters()
    hosts = list(plan["workers"])
    logs = {h: plan["workers"][h]["log"] for h in hosts}
    t0 = time.monotonic()
    ev = {}

    def mark(name):
        ev[name] = round(time.monotonic() - t0, 2)
        print(f"[{ev[name]:7.2f} s] {name}", flush=True)

    jobs, batches = c.submit_batches(plan["slices"], plan["posts"])
    studies = c.submit_studies(plan["studies"], plan["study_slices"])
    mark(f"submitted {len(jobs)} slices in {len(batches)} batches + {len(studies)} studies")

    # wait until every worker host holds running work and (cut_after_done) the host to cut has finished that
    # many jobs already, then cut it (the chosen one, else the busiest)
    deadline = time.monotonic() + 180
    running, cut = {}, None
    while time.monotonic() < deadline:
        running = c.running()
        if all(running.get(h) for h in hosts):
            done = c.done_per_host(jobs)
            ready = [h for h in ([plan["cut_host"]] if plan["cut_host"] else hosts)
                     if done.get(h, 0) >= plan["cut_after_done"]]
            if ready:
                cut = max(ready, key=lambda h: len(running.get(h, [])))
                break
        time.sleep(0.1)
    else:
        raise RuntimeError(f"no worker host to cut within 180 s: running {running}")
    inflight = sorted(running.get(cut, []))
    log_at_cut = _log_size(logs[cut])
    _set_cut(plan, cut, True)
    cut_at = time.monotonic()
    cut_wall = datetime.now(timezone.utc)
    mark(f"cut {cut} ({plan['cut']}) holding {len(inflight)} running; running per host "
         f"{ {h: len(v) for h, v in running.items()} }")
    broker_at_cut = c.broker_state()

    # everything must finish on the surviving hosts: polled through the API replicas (round robin), as a client
    # would (GET /api/v1/batches/{id}, /api/v1/studies/{id}), then confirmed from the rows
    deadline = time.monotonic() + plan["done_timeout"]
    open_batches, open_studies = set(batches), set(studies)
    while time.monotonic() < deadline:
        open_batches = {b for b in open_batches if not c.get(f"/api/v1/batches/{b}")["done"]}
        open_studies = {s for s in open_studies if c.get(f"/api/v1/studies/{s}")["status"] not in TERMINAL}
        if not open_batches and not open_studies:
            st = c.rows(jobs, studies)
            if len(st) == len(jobs) + len(studies) and all(r["status"] in TERMINAL for r in st.values()):
                break
        time.sleep(0.5)
    else:
        pending = {k: v["status"] for k, v in c.rows(jobs, studies).items() if v["status"] not in TERMINAL}
        raise RuntimeError(f"{len(pending)} jobs/studies not finished {plan['done_timeout']} s after the cut "
                           f"(cut host still cut): {list(pending.items())[:10]}; broker {c.broker_state()}")
    mark("all finished while the host was cut off")
    # keep the host cut at least min_cut_seconds (its S3/DB requests time out and its task gives up)
    while time.monotonic() - cut_at < plan["min_cut_seconds"]:
        time.sleep(0.2)
    rows_a = c.rows(jobs, studies)
    objs_a = c.objects(jobs, studies)
    open_before = tasks_in_progress(_log_since(logs[cut], 0))

    _set_cut(plan, cut, False)
    restored_at = time.monotonic()
    restored_wall = datetime.now(timezone.utc)
    cut_seconds = restored_at - cut_at
    mark(f"restored {cut} after {cut_seconds:.1f} s (its tasks still open: {len(open_before)})")

    # settle: the cut host's open tasks end (its late attempt), nothing runs or waits, and at least settle_min
    # seconds pass (segments the kernel still retransmits after the link is back arrive within them)
    deadline = restored_at + plan["settle_timeout"]
    open_now = open_before
    while time.monotonic() < deadline:
        open_now = tasks_in_progress(_log_since(logs[cut], 0))
        b = c.broker_state()
        quiet = not open_now and not c.running() and not any(b["queued"].values())
        if quiet and time.monotonic() - restored_at >= plan["settle_min"]:
            break
        time.sleep(0.5)
    mark("settled" if not open_now else f"settle timeout: {cut} still has open tasks {open_now}")
    rows_b = c.rows(jobs, studies)
    objs_b = c.objects(jobs, studies)
    broker_end = c.broker_state()
    late_text = _log_since(logs[cut], log_at_cut)
    late_tasks = [m.group(0)[:220] for m in _TASK_LINE.finditer(late_text)]
    late_warnings = [ln[:240] for ln in late_text.splitlines() if "WARNING" in ln or "ERROR" in ln][:12]

    counters1 = c.service_counters()
    sweeps = [ln[:200] for h in hosts if h != cut for ln in _log_since(logs[h], 0).splitlines() if "sweep: {" in ln]
    # a probe after the heal: new work is taken by every host again (the cut host rejoined)
    probe = {}
    if plan.get("probe_slices"):
        pjobs, _ = c.submit_batches(plan["probe_slices"], 1)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            pst = c.rows(pjobs, [])
            if len(pst) == len(pjobs) and all(r["status"] in TERMINAL for r in pst.values()):
                break
            time.sleep(0.5)
        pst = c.rows(pjobs, [])
        probe = {"jobs": len(pjobs), "succeeded": sum(r["status"] == "succeeded" for r in pst.values()),
                 "per_host": {}}
        for r in pst.values():
            probe["per_host"][host_of(r["worker"])] = probe["per_host"].get(host_of(r["worker"]), 0) + 1
        mark(f"probe after the heal: {probe}")

    # --- reconciliation ---
    from shared.service.storage import result_key, study_result_key
    kinds = ("mask", "probability", "overlay")
    job_rows = {j: rows_b[j] for j in jobs}
    study_rows = {s: rows_b[s] for s in studies}
    succeeded_jobs = [j for j, r in job_rows.items() if r["status"] == "succeeded"]
    succeeded_studies = [s for s, r in study_rows.items() if r["status"] == "succeeded"]
    per_host = {h: {"jobs": 0, "studies": 0} for h in hosts}
    for rid, r in rows_b.items():
        if r["status"] == "succeeded":
            e = per_host.setdefault(host_of(r["worker"]), {"jobs": 0, "studies": 0})
            e["studies" if rid in study_rows else "jobs"] += 1
    redelivered = sorted(rid for rid, r in rows_b.items() if r["attempts"] > 1)
    # one result set per job (its 3 PNGs) and per study (the files its row names); nothing else under them
    extra, missing = [], []
    for j in jobs:
        want = {result_key(j, k) for k in kinds}
        have = {k for k in objs_b if k.startswith(f"results/{j}/")}
        extra += sorted(have - want)
        missing += sorted(want - have) if job_rows[j]["status"] == "succeeded" else []
    for s in studies:
        want = {study_result_key(s, n) for n in json.loads(study_rows[s]["result_checksums"] or "{}")}
        have = {k for k in objs_b if k.startswith(f"studies/{s}/")}
        extra += sorted(have - want)
        missing += sorted(want - have)
    # two different contents ever stored under one key = a duplicate result (versions with different ETags)
    conflicting = sorted(k for k, v in objs_b.items() if len({e for _, e, _ in v["versions"]}) > 1)
    rewritten = {k: {"before": objs_a.get(k), "after": objs_b.get(k)}
                 for k in sorted(set(objs_a) | set(objs_b)) if objs_a.get(k) != objs_b.get(k)}
    rewritten_other_bytes = sorted(k for k, v in rewritten.items()
                                   if (v["before"] or {}).get("etag") != (v["after"] or {}).get("etag"))
    changed_rows = sorted(rid for rid in rows_a if rows_a[rid] != rows_b[rid])
    bad_sums = c.check_checksums(rows_b, succeeded_jobs)
    inflight_done_elsewhere = [i for i in inflight if rows_b.get(i, {}).get("status") == "succeeded"
                               and host_of(rows_b[i]["worker"]) != cut]
    lost = [rid for rid in jobs + studies if rows_b.get(rid, {}).get("status") != "succeeded"]
    kind_sizes: dict[str, list[int]] = {}
    for k, v in objs_b.items():
        if k.startswith("results/") and v.get("size") is not None:
            kind_sizes.setdefault(k.rsplit("/", 1)[1], []).append(v["size"])
    result_sizes = {k: round(statistics.mean(v)) for k, v in sorted(kind_sizes.items())}
    writes_landed = sorted({v["after"]["last_modified"] for v in rewritten.values() if v.get("after")})
    summary = {
        "jobs_submitted": len(jobs), "studies_submitted": len(studies), "batches": len(batches),
        "jobs_succeeded": len(succeeded_jobs), "studies_succeeded": len(succeeded_studies),
        "finished_per_host": per_host, "cut_host": cut, "cut_mode": plan["cut"], "cut_seconds": round(cut_seconds, 1),
        "inflight_on_cut_host": len(inflight), "inflight_finished_on_other_hosts": len(inflight_done_elsewhere),
        "redelivered": len(redelivered), "duplicates": len(extra) + len(conflicting), "lost": len(lost),
        "rows_changed_after_restore": len(changed_rows), "objects_rewritten_after_restore": len(rewritten),
        "objects_rewritten_with_other_bytes": len(rewritten_other_bytes),
        "missing_results": len(missing), "checksum_mismatches": len(bad_sums),
        "cut_host_tasks_open_at_restore": len(open_before), "cut_host_tasks_open_at_end": len(open_now),
    }
    summary["ok"] = (not lost and not extra and not conflicting and not changed_rows and not missing
                     and not bad_sums and len(inflight_done_elsewhere) == len(inflight) and not open_now)
    summary["overwrite_free"] = not rewritten
    return {"summary": summary, "events_s": ev, "inflight_ids": inflight, "redelivered_ids": redelivered,
            "lost_ids": lost, "duplicate_keys": extra + conflicting, "rewritten_after_restore": rewritten,
            "rewrites_landed_at": writes_landed, "cut_at": cut_wall.isoformat(),
            "restored_at": restored_wall.isoformat(),
            "changed_rows": {r: [rows_a[r], rows_b[r]] for r in changed_rows}, "missing_results": missing,
            "broker_at_cut": broker_at_cut, "broker_end": broker_end, "cut_host_task_log": late_tasks,
            "cut_host_warnings": late_warnings, "sweeps_on_other_hosts": sweeps, "probe_after_heal": probe,
            "api_calls": c.calls,
            "result_object_mean_bytes": result_sizes,
            "versioning": plan.get("versioning"), "service_costs": _per_job_costs(counters0, counters1, len(jobs),
                                                                                    len(studies)),
            "rows": rows_b}


def _per_job_costs(a: dict, b: dict, n_jobs: int, n_studies: int) -> dict:
    """Redis commands, PostgreSQL row writes and bucket objects/bytes between two counter snapshots."""
    calls = {k: b["redis_calls"].get(k, 0) - a["redis_calls"].get(k, 0) for k in b["redis_calls"]}
    calls = {k: v for k, v in sorted(calls.items(), key=lambda kv: -kv[1]) if v > 0}
    pg = {}
    for t, v in b["pg_tables"].items():
        old = a["pg_tables"].get(t, {"ins": 0, "upd": 0, "del": 0})
        d = {k: v[k] - old[k] for k in v}
        if any(d.values()):
            pg[t] = d
    return {"jobs": n_jobs, "studies": n_studies, "pg_connections_by_addr": b.get("pg_connections_by_addr"),
            "jobs_table_bytes_per_row": round(b["jobs_table_bytes"] / b["jobs_rows"]) if b.get("jobs_rows") else None,
            "redis_commands": calls,
            "redis_commands_total": sum(calls.values()), "pg_row_writes": pg,
            "pg_commits": b["pg_commits"] - a["pg_commits"], "objects_added": b["objects"] - a["objects"],
            "bytes_added": b["bytes"] - a["bytes"]}


_PHASES = re.compile(r"task timings: slices=(\d+) (.*)$", re.M)


def task_phases(text: str) -> dict:
    tasks, slices, sums = 0, 0, {}
    for m in _PHASES.finditer(text):
        tasks += 1
        slices += int(m.group(1))
        for kv in m.group(2).split():
            k, v = kv.split("=")
            sums[k] = sums.get(k, 0.0) + float(v)
    if not slices:
        return {"tasks": 0, "slices": 0}
    total = sums.get("total", 0.0)
    infer = sums.get("infer", 0.0)
    return {"tasks": tasks, "slices": slices, "infer_s_per_slice": round(infer / slices, 4),
            "overhead_s_per_slice": round((total - infer) / slices, 4),
            "overhead_cpu_s_per_slice": round((sums.get("total_cpu", 0.0) - sums.get("infer_cpu", 0.0)) / slices, 4),
            "task_s_per_slice": round(total / slices, 4),
            "cpu_s_per_slice": round(sums.get("total_cpu", 0.0) / slices, 4),
            "infer_cpu_s_per_slice": round(sums.get("infer_cpu", 0.0) / slices, 4),
            "phases_s_per_slice": {k: round(v / slices, 4) for k, v in sums.items() if not k.endswith("_cpu")}}


def drive_throughput(plan: dict) -> dict:
    from sqlalchemy import func, select

    from shared.service import db
    c = Client(plan)
    c.wait_healthy()
    hosts = plan["hosts"]

    def run_batch(n):
        submitted = datetime.now(timezone.utc)
        jobs, batch_ids = c.submit_batches(n, max(1, n // 48))
        deadline = time.monotonic() + plan.get("batch_timeout", 900)
        while True:
            if all(c.get(f"/api/v1/batches/{b}")["done"] for b in batch_ids):   # via the API replicas
                st = c.rows(jobs, [])
                if all(r["status"] in TERMINAL for r in st.values()) and len(st) == len(jobs):
                    break
            else:
                st = {}
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch of {n} not finished in time: "
                                   f"{sum(r['status'] in TERMINAL for r in st.values())} done")
            time.sleep(1.0)     # slow on purpose: polling costs CPU the workers need; times come from the DB
        with c.engine.connect() as conn:
            lo, hi = conn.execute(select(func.min(db.Job.started_at), func.max(db.Job.finished_at))
                                  .where(db.Job.id.in_(jobs))).one()
        return jobs, st, submitted, lo, hi

    run_batch(8 * len(hosts) * 2)      # warm-up: every host's first tasks pay one-off costs
    # idle baseline: what the workers' polling and sweeps cost per second with nothing to do
    idle0, t_idle = c.service_counters(), time.monotonic()
    time.sleep(plan.get("idle_seconds", 15))
    idle1, idle_s = c.service_counters(), time.monotonic() - t_idle
    rounds = []
    counters0 = c.service_counters()
    t_busy = time.monotonic()
    for _ in range(plan["rounds"]):
        offsets = {h: _log_size(plan["workers"][h]["log"]) for h in hosts}
        jobs, st, submitted, lo, hi = run_batch(plan["slices"])
        per_host = {}
        for r in st.values():
            per_host[host_of(r["worker"])] = per_host.get(host_of(r["worker"]), 0) + 1
        phases = {h: task_phases(_log_since(plan["workers"][h]["log"], offsets[h])) for h in hosts}
        wall = (hi - submitted).total_seconds()
        span = (hi - lo).total_seconds()
        rounds.append({"slices": len(jobs), "succeeded": sum(r["status"] == "succeeded" for r in st.values()),
                       "redelivered": sum(r["attempts"] > 1 for r in st.values()),
                       "seconds": round(wall, 2), "slices_per_second": round(len(jobs) / wall, 2),
                       "worker_span_s": round(span, 2), "worker_slices_per_second": round(len(jobs) / span, 2),
                       "jobs_per_host": per_host, "phases_per_host": phases})
    counters1 = c.service_counters()
    busy_s = time.monotonic() - t_busy
    n = sum(r["slices"] for r in rounds)
    busy = _per_job_costs(counters0, counters1, n, 0)
    idle = _per_job_costs(idle0, idle1, 0, 0)
    idle_redis_per_s = idle["redis_commands_total"] / idle_s
    idle_commits_per_s = idle["pg_commits"] / idle_s
    per_job = {
        "redis_commands_per_job": round((busy["redis_commands_total"] - idle_redis_per_s * busy_s) / n, 1),
        "redis_commands_per_job_raw": round(busy["redis_commands_total"] / n, 1),
        "idle_redis_commands_per_s": round(idle_redis_per_s, 1),
        "pg_commits_per_job": round((busy["pg_commits"] - idle_commits_per_s * busy_s) / n, 2),
        "idle_pg_commits_per_s": round(idle_commits_per_s, 2),
        "pg_row_writes_per_job": {t: {k: round(v / n, 2) for k, v in d.items()}
                                  for t, d in busy["pg_row_writes"].items()},
        "objects_per_job": round(busy["objects_added"] / n, 2),
        "bytes_per_job": round(busy["bytes_added"] / n),
        "busy_seconds": round(busy_s, 1), "idle_seconds": round(idle_s, 1)}
    return {"rounds": rounds, "service_costs": busy, "idle_costs": idle, "per_job": per_job}


def cmd_drive(args) -> int:
    plan = json.loads(Path(args.plan).read_text())
    out = drive_cutoff(plan) if plan["mode"] == "cutoff" else drive_throughput(plan)
    Path(args.out).write_text(json.dumps(out, default=str))
    return 0


# --- tables ---------------------------------------------------------------------------------------------------
def print_cutoff(result: dict) -> None:
    s = result["summary"]
    hosts = sorted(s["finished_per_host"])
    print("\n| jobs submitted | studies | " + " | ".join(f"finished on {h}" for h in hosts)
          + " | redelivered (attempts > 1) | duplicates | lost | rows changed after restore | "
            "objects rewritten after restore |")
    print("| --- | --- | " + " | ".join("---" for _ in hosts) + " | --- | --- | --- | --- | --- |")
    print(f"| {s['jobs_submitted']} | {s['studies_submitted']} | "
          + " | ".join(f"{s['finished_per_host'][h]['jobs']} + {s['finished_per_host'][h]['studies']} studies"
                       for h in hosts)
          + f" | {s['redelivered']} | {s['duplicates']} | {s['lost']} | {s['rows_changed_after_restore']} | "
            f"{s['objects_rewritten_after_restore']} ({s['objects_rewritten_with_other_bytes']} with other bytes) |")
    print(f"\ncut {s['cut_host']} ({s['cut_mode']}, {s['cut_seconds']} s) holding {s['inflight_on_cut_host']} "
          f"running; {s['inflight_finished_on_other_hosts']} of them finished on other hosts")
    print(f"events (s): {result.get('events_s')}")
    print("cut host's tasks: " + "; ".join(result.get("cut_host_task_log", [])[-6:]))
    if result.get("rewrites_landed_at"):
        print(f"rewrites landed at {result['rewrites_landed_at'][:3]} (restored at {result['restored_at']})")
    print(("OK" if s["ok"] else "FAILED") + (", no object rewritten" if s["overwrite_free"]
                                            else ", BUT result objects were rewritten after the heal"))


def print_scale(result: dict) -> None:
    print("\n| worker hosts | slices | slices/s (submit -> last done) | worker span slices/s | jobs per host | "
          "model s/slice | overhead s/slice (wall) | overhead CPU s/slice | worker CPU s/slice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in result["runs"]:
        for r in run["rounds"]:
            ph = [p for p in r["phases_per_host"].values() if p.get("slices")]
            sl = sum(p["slices"] for p in ph) or 1
            infer = sum(p["infer_s_per_slice"] * p["slices"] for p in ph) / sl
            over = sum(p["overhead_s_per_slice"] * p["slices"] for p in ph) / sl
            over_cpu = sum(p["overhead_cpu_s_per_slice"] * p["slices"] for p in ph) / sl
            cpu = sum(p.get("cpu_s_per_slice", 0.0) * p["slices"] for p in ph) / sl
            print(f"| {run['worker_hosts']} | {r['slices']} | {r['slices_per_second']} | "
                  f"{r['worker_slices_per_second']} | "
                  f"{' / '.join(str(v) for _, v in sorted(r['jobs_per_host'].items()))} | "
                  f"{infer:.3f} | {over:.3f} | {over_cpu:.3f} | {cpu:.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--backend", default="int8", help="COVIDSEG_INFERENCE_BACKEND of the workers (int8: the "
                       "cached INT8 model, shared through COVIDSEG_CACHE_DIR; fp32 needs no build)")
        q.add_argument("--nice", type=int, default=10, help="nice level of the workers and API replicas")
        q.add_argument("--s3-timeout", type=float, default=3.0, help="COVIDSEG_S3_TIMEOUT (s)")
        q.add_argument("--tag", default="", help="namespace tag (default random)")
        q.add_argument("--keep", action="store_true", help="keep logs under /tmp/covidseg-cluster-<tag>")
        q.add_argument("--json", default="")
    r = sub.add_parser("run", help="the cut-off run")
    common(r)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--slices", type=int, default=64)
    r.add_argument("--posts", type=int, default=4, help="POSTs the slices are split into (one batch each)")
    r.add_argument("--studies", type=int, default=2)
    r.add_argument("--study-slices", type=int, default=5)
    r.add_argument("--cut", choices=("link", "freeze"), default="link")
    r.add_argument("--cut-host", default="", help="worker host to cut (default: the one with most running)")
    r.add_argument("--cut-after-done", type=int, default=8,
                   help="cut a host only once it has finished this many jobs (and runs more): mid-batch")
    r.add_argument("--min-cut-seconds", type=float, default=30.0,
                   help="keep the host cut at least this long (longer than its S3 retries)")
    r.add_argument("--settle-timeout", type=float, default=180.0)
    r.add_argument("--settle-min", type=float, default=20.0, help="seconds to watch after the heal at least")
    r.add_argument("--probe-slices", type=int, default=16, help="slices submitted after the heal (0: none)")
    r.add_argument("--done-timeout", type=float, default=600.0)
    s = sub.add_parser("scale", help="throughput versus number of worker hosts")
    common(s)
    s.add_argument("--hosts", default="1,2,3")
    s.add_argument("--slices", type=int, default=96)
    s.add_argument("--rounds", type=int, default=2)
    c = sub.add_parser("cleanup", help="remove the namespaces and processes of a run")
    c.add_argument("--tag", default="")
    c.add_argument("--stale", action="store_true", help="every run whose supervisor is dead")
    sv = sub.add_parser("_services", help=argparse.SUPPRESS)
    sv.add_argument("--addr", required=True)
    sv.add_argument("--dir", required=True)
    sv.add_argument("--state", required=True)
    d = sub.add_parser("_drive", help=argparse.SUPPRESS)
    d.add_argument("--plan", required=True)
    d.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "cleanup":
        removed = cleanup(args.tag or None, stale=args.stale or not args.tag)
        print(f"removed {len(removed)} namespaces: {removed}")
        return 0
    return {"run": cmd_run, "scale": cmd_scale, "_services": cmd_services, "_drive": cmd_drive}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
