"""Session-scoped fixtures that start REAL backing services, lazily (only for tests that ask for them), and stop
them when the session ends. Reusable by other suites (web/browser tests):

    redis_server        redis-server on a free port (`--save ''`), with .restart()/.stop()/.start()
    s3_server           SeaweedFS `weed mini` S3 gateway on free ports, with .restart()/.stop()/.start()
    postgres_server     throwaway PostgreSQL cluster (initdb/pg_ctl as user postgres)
    sqlite_url, pg_url  migrated databases (alembic upgrade head: the only way the schema is created)
    stack               the whole service: DB (param: "sqlite" | "postgresql"), Redis, S3 bucket, the API under
                        gunicorn on a free port, a bearer token, and the Celery workers started on demand
                        (`stack.ensure_worker()`): an interactive worker (`stack.worker`, -Q interactive) and a
                        niced bulk worker (`stack.bulk_worker`, -Q bulk: batches and studies), as in
                        production. Use `@pytest.mark.parametrize("stack", ["postgresql"],
                        indirect=True)` to pin one backend.

Processes are niced (they share 2 cores with other work). Nothing here touches /work/shared or the repo tree
(all data lives in pytest's temporary directories and /tmp/covidseg-pg-*).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import localstack  # noqa: E402

S3_ACCESS_KEY = "covidseg-test"
S3_SECRET_KEY = "covidseg-test-secret"
NICE = int(os.environ.get("COVIDSEG_TEST_NICE", "15"))
SLICES = REPO / "tests" / "fixtures" / "slices"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> Path:
    """One INT8/ONNX cache for the whole session (COVIDSEG_CACHE_DIR, inherited by CLI subprocesses and passed to
    the stacks' workers): the core tests and the service stacks build the shipped weights' INT8 model once."""
    old = os.environ.get("COVIDSEG_CACHE_DIR")
    cache = tmp_path_factory.mktemp("covidseg-cache")
    os.environ["COVIDSEG_CACHE_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("COVIDSEG_CACHE_DIR", None)
    else:
        os.environ["COVIDSEG_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def int8_cache(_isolated_cache) -> Path:
    """The session cache holding the shipped weights' INT8 model (converted here once if no test did before), so
    workers start in about a second without importing TensorFlow, as they do in production (backend "auto" on a
    CPU), instead of building the fp32 Keras model in every pool process (~10 s of CPU each)."""
    from shared.core.inference import Segmenter

    Segmenter(backend="int8", cache_root=_isolated_cache, log=None)
    return _isolated_cache


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_server(services_dir):
    server = localstack.RedisServer(services_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(services_dir):
    server = localstack.SeaweedS3(services_dir / "weed", S3_ACCESS_KEY, S3_SECRET_KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    server = localstack.Postgres().start()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def pg_url(postgres_server) -> str:
    url = postgres_server.create_database("covidseg_test")
    localstack.migrate(url)
    return url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'covidseg.db'}"
    localstack.migrate(url)
    return url


def make_test_env(database_url: str, redis_url: str, s3_endpoint: str, bucket: str, **extra) -> dict:
    """COVIDSEG_* variables for a test stack: short sweep/heartbeat periods so recovery is observable fast."""
    env = {
        "COVIDSEG_DATABASE_URL": database_url, "COVIDSEG_BROKER_URL": redis_url,
        "COVIDSEG_S3_ENDPOINT": s3_endpoint, "COVIDSEG_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "COVIDSEG_S3_SECRET_KEY": S3_SECRET_KEY, "COVIDSEG_S3_BUCKET": bucket,
        "COVIDSEG_HEARTBEAT_INTERVAL": "1", "COVIDSEG_STALE_AFTER": "6", "COVIDSEG_SWEEP_INTERVAL": "2",
        "COVIDSEG_DISPATCH_GRACE": "4", "COVIDSEG_TASK_SOFT_TIME_LIMIT": "240", "COVIDSEG_TASK_TIME_LIMIT": "300",
        "COVIDSEG_BROKER_VISIBILITY_TIMEOUT": "900", "COVIDSEG_MAX_UPLOAD_BYTES": str(4 * 1024 * 1024),
        "COVIDSEG_MAX_REQUEST_BYTES": str(8 * 1024 * 1024), "COVIDSEG_MAX_FILES_PER_REQUEST": "25",
        "COVIDSEG_PREDICT_TIMEOUT": "150", "COVIDSEG_API_WORKERS": "2", "COVIDSEG_API_THREADS": "8",
        "COVIDSEG_TOKEN_CACHE_SECONDS": "2", "COVIDSEG_TF_THREADS": "2", "COVIDSEG_INFER_BATCH_SIZE": "8",
        "COVIDSEG_LOG_LEVEL": "INFO",
        # INT8 from the session cache (the `int8_cache` fixture builds it once), the CPU production path
        "COVIDSEG_INFERENCE_BACKEND": "int8", "COVIDSEG_CACHE_DIR": os.environ["COVIDSEG_CACHE_DIR"],
    }
    env.update({f"COVIDSEG_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class Stack:
    """A running service: API (gunicorn) + optional worker, over the session's Redis/S3 and one database."""

    def __init__(self, backend: str, env: dict, workdir: Path, redis_server, s3_server):
        from shared.service import db
        from shared.service.settings import Settings
        from shared.service.storage import Storage

        self.backend, self.env, self.dir = backend, env, workdir
        self.redis_server, self.s3_server = redis_server, s3_server
        self.settings = Settings.from_env(env)
        self.storage = Storage.from_settings(self.settings)
        self.storage.ensure_bucket()
        self.engine = db.make_engine(self.settings)
        self.Session = db.make_sessionmaker(self.engine)
        self.token = localstack.create_token(env, f"tests-{backend}")
        self.port = localstack.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_log = workdir / "api.log"
        self.api = localstack.start_api(env, self.api_log, self.port, nice=NICE)
        self.worker = None          # interactive queue
        self.bulk_worker = None     # bulk queue (batches, studies), niced
        self.worker_log = workdir / "worker.log"
        self.bulk_worker_log = workdir / "worker-bulk.log"
        self._worker_log_offset = 0
        self._bulk_worker_log_offset = 0

    # --- HTTP --------------------------------------------------------------------------------------------------
    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path, **kw):
        import requests
        kw.setdefault("headers", self.auth)
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path, **kw):
        import requests
        kw.setdefault("headers", self.auth)
        return requests.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def submit(self, paths_or_items, headers=None):
        """paths (fixtures) or (name, bytes, content_type) tuples -> response of POST /api/v1/jobs."""
        files = []
        for it in paths_or_items:
            if isinstance(it, (str, Path)):
                p = Path(it)
                files.append(("file", (p.name, p.read_bytes(), "application/octet-stream")))
            else:
                files.append(("file", it))
        return self.post("/api/v1/jobs", files=files, headers={**self.auth, **(headers or {})})

    def wait_job(self, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=180.0) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            r = self.get(f"/api/v1/jobs/{job_id}")
            assert r.status_code == 200, r.text
            body = r.json()
            if body["status"] in statuses:
                return body
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {statuses} after {timeout}s: {body}\n{self.tail_logs()}")

    def wait_batch(self, batch_id, timeout=300.0) -> dict:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            r = self.get(f"/api/v1/batches/{batch_id}")
            assert r.status_code == 200, r.text
            body = r.json()
            if body["done"]:
                return body
            time.sleep(0.5)
        raise AssertionError(f"batch {batch_id} not done after {timeout}s: {body}\n{self.tail_logs()}")

    def tail_logs(self, n=40) -> str:
        out = []
        for p in (self.worker_log, self.bulk_worker_log, self.api_log):
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                lines = []
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def redis_server_client(self):
        import redis
        return redis.Redis.from_url(self.settings.broker_url, socket_timeout=5)

    # --- worker ------------------------------------------------------------------------------------------------
    def ensure_worker(self, timeout=300.0):
        """Start whatever of the two workers is not running and wait until both have loaded the model."""
        def alive(p):
            return p is not None and p.poll() is None
        if alive(self.worker) and alive(self.bulk_worker):
            return self.worker
        if not alive(self.worker):
            self._worker_log_offset = self.worker_log.stat().st_size if self.worker_log.exists() else 0
            self.worker = localstack.start_worker(
                self.env, self.worker_log, name=f"test-{self.backend}", nice=NICE,
                queues=self.settings.queue_interactive)
        if not alive(self.bulk_worker):
            self._bulk_worker_log_offset = (self.bulk_worker_log.stat().st_size if self.bulk_worker_log.exists()
                                            else 0)
            self.bulk_worker = localstack.start_worker(
                self.env, self.bulk_worker_log, name=f"test-{self.backend}-bulk",
                nice=min(19, NICE + localstack.BULK_NICE), queues=self.settings.queue_bulk)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in (self.worker, self.bulk_worker):
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited with {proc.returncode}\n{self.tail_logs()}")
            if localstack.worker_ready(self.worker_log, self._worker_log_offset) and \
                    localstack.worker_ready(self.bulk_worker_log, self._bulk_worker_log_offset):
                return self.worker
            time.sleep(0.3)
        raise AssertionError(f"workers not ready after {timeout}s\n{self.tail_logs()}")

    def kill_worker(self, sig=signal.SIGKILL):
        """kill -9 both workers (main processes and pool children)."""
        for proc in (self.worker, self.bulk_worker):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, sig)
                proc.wait(30)
        self.worker = self.bulk_worker = None

    def stop_worker(self):
        localstack.stop_process(self.worker, signal.SIGTERM, timeout=60)
        localstack.stop_process(self.bulk_worker, signal.SIGTERM, timeout=60)
        self.worker = self.bulk_worker = None

    def close(self):
        self.stop_worker()
        localstack.stop_process(self.api)
        self.engine.dispose()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def stack(request, services_dir, redis_server, s3_server, int8_cache):
    backend = request.param
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    redis_db = 1 if backend == "sqlite" else 2
    redis_server_url = f"redis://127.0.0.1:{redis_server.port}/{redis_db}"
    env = make_test_env(url, redis_server_url, s3_server.endpoint, f"covidseg-{backend}")
    workdir = services_dir / f"stack-{backend}"
    workdir.mkdir(exist_ok=True)
    st = Stack(backend, env, workdir, redis_server, s3_server)
    yield st
    st.close()


@pytest.fixture(scope="session")
def slice_paths():
    paths = sorted(SLICES.glob("*"))
    assert len(paths) >= 4
    return paths


@pytest.fixture(scope="session")
def make_dicom():
    """f(hu: 2-D int16 array of Hounsfield units) -> bytes of a CT DICOM file (explicit VR little endian)."""
    def make(hu) -> bytes:
        import io

        import numpy as np
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
        stored = (np.asarray(hu, dtype=np.int32) + 1024).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    return make
