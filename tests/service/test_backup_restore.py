"""`covidseg service backup` / `restore` (cli/backup.py) against the session's real SeaweedFS and PostgreSQL.

The source is a migrated SQLite database filled through the real API (Flask test client: tokens, a batch and a
single upload with their input objects, an idempotency key) plus what the workers and the dashboard write (claims,
results with their objects, a failure, a still-running job, studies, admin account/session/action, audit events),
and a bucket with a few extra objects (user metadata, other headers, one multipart-sized object).
It is backed up, restored into a fresh PostgreSQL database and bucket, backed up again and restored into a fresh
SQLite database and bucket: every row of every table and every object (bytes, content type, metadata) must come
through, and the restored stack must serve the jobs and results to the old token. Then the refusals.

Own buckets (bkp-*), databases (backup_*), Redis db 13 and queue names, so no other test is disturbed.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLICES = REPO / "tests" / "fixtures" / "slices"
REDIS_DB = 13
S3_KEYS = {"COVIDSEG_S3_ACCESS_KEY": "covidseg-test", "COVIDSEG_S3_SECRET_KEY": "covidseg-test-secret"}
QUEUES = {"queue_interactive": "bkp.interactive", "queue_bulk": "bkp.bulk"}


# --- helpers ---------------------------------------------------------------------------------------------------
def _settings(ctx, database_url, bucket):
    from shared.service.settings import Settings
    return Settings.from_env({}, database_url=database_url, broker_url=ctx.broker, s3_endpoint=ctx.s3_endpoint,
                             s3_access_key=S3_KEYS["COVIDSEG_S3_ACCESS_KEY"],
                             s3_secret_key=S3_KEYS["COVIDSEG_S3_SECRET_KEY"], s3_bucket=bucket,
                             result_links="api", token_cache_seconds=0.0, rate_limit_per_minute=0, daily_quota=0,
                             **QUEUES)


def _cli(ctx, *argv) -> tuple[int, str, str]:
    """`covidseg ...` in-process (the error convention lives in cli.main); (exit code, stdout, stderr)."""
    import contextlib

    import cli
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("COVIDSEG_S3_ENDPOINT", ctx.s3_endpoint)
        for k, v in S3_KEYS.items():
            mp.setenv(k, v)
        mp.delenv("COVIDSEG_DATABASE_URL", raising=False)
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _last_line(err: str) -> str:
    """The error line (after any progress bar, which draws with carriage returns)."""
    return [ln for ln in re.split(r"[\r\n]", err) if ln.strip()][-1]


def _fresh_sqlite(tmp_path_factory, name, revision="head") -> str:
    import localstack
    url = f"sqlite:///{tmp_path_factory.mktemp(name) / 'covidseg.db'}"
    localstack.migrate(url, revision)
    return url


def _fresh_pg(postgres_server, name) -> str:
    import localstack
    url = postgres_server.create_database(name)
    localstack.migrate(url)
    return url


def all_rows(url) -> dict[str, list[dict]]:
    """Every row of every table (model types: aware UTC datetimes, bools, floats), in primary-key order."""
    from sqlalchemy import select

    from cli.backup import _tables
    from shared.service.db import make_engine
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: [dict(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns)).mappings()]
                    for t in _tables()}
    finally:
        engine.dispose()


def all_objects(settings) -> dict[str, tuple[bytes, str, dict]]:
    """key -> (bytes, content type, user metadata) of every object of the settings' bucket."""
    from shared.service.storage import Storage
    st = Storage.from_settings(settings)
    out = {}
    for key in st.list_keys():
        info = st.client.stat_object(st.bucket, key)
        meta = {k.lower(): v for k, v in info.metadata.items() if k.lower().startswith("x-amz-meta-")}
        out[key] = (st.get_bytes(key), info.content_type, meta)
    return out


def _png(value: int, size=(32, 24)) -> bytes:
    import cv2
    import numpy as np
    ok, buf = cv2.imencode(".png", np.full(size, value, np.uint8))
    assert ok
    return buf.tobytes()


def _expected_after_restore(rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """What restore makes of the source: identical, except that queued/running jobs and studies are queued
    again without a lease or a dispatch time (the sweep re-publishes them)."""
    from cli.backup import _requeue
    return {name: [_requeue(dict(r)) if name in ("jobs", "studies") else r for r in table]
            for name, table in rows.items()}


# --- the source stack, its backup, the restores ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory, redis_server, s3_server, postgres_server):
    import redis

    from api import create_app
    from shared.service import admin_users, db
    from shared.service.storage import Storage, result_key, study_input_key, study_result_key

    class Ctx:
        pass
    c = Ctx()
    c.tmp = tmp_path_factory
    c.s3_endpoint = s3_server.endpoint
    c.broker = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    redis.Redis.from_url(c.broker).flushdb()
    c.src_url = _fresh_sqlite(tmp_path_factory, "bkp-src")
    c.src = _settings(c, c.src_url, "bkp-src")
    storage = Storage.from_settings(c.src)
    storage.ensure_bucket()

    app = create_app(c.src)
    app.config["TESTING"] = True
    svc = app.extensions["covidseg"]
    with svc.Session() as s:
        user_row, c.token = db.create_token(s, "lab-1", scopes="read submit")
        db.audit(s, "cli:root", "token.create", f"token:{user_row.id}", name="lab-1", note="café ✓")
        admin_row, c.admin_token = db.create_token(s, "ops", scopes="read submit admin",
                                                   expires_at=db.utcnow() + timedelta(days=30))
        gone, c.revoked_token = db.create_token(s, "old", scopes="read")
        gone.revoked_at = db.utcnow()
        s.commit()
        c.token_id = user_row.id

    client = app.test_client()
    auth = {"Authorization": f"Bearer {c.token}"}
    slices = sorted(SLICES.glob("*.png"))
    r = client.post("/api/v1/jobs", headers={**auth, "Idempotency-Key": "batch-1"}, content_type="multipart/form-data",
                    data={"file": [(io.BytesIO(p.read_bytes()), p.name) for p in slices[:4]]})
    assert r.status_code == 202, r.get_data(as_text=True)
    c.batch_id = r.get_json()["batch_id"]
    batch = [j["id"] for j in r.get_json()["jobs"]]
    r = client.post("/api/v1/jobs", headers=auth, content_type="multipart/form-data",
                    data={"file": [(io.BytesIO(slices[0].read_bytes()), "single.png")]})
    assert r.status_code == 202
    c.queued_job = r.get_json()["jobs"][0]["id"]

    # what the workers do: claim, write the three results, finish; one fails, one is still running
    with svc.Session() as s:
        claimed = db.claim_jobs(s, batch, "lease-1", "worker-a@host", stale_after=45)
        assert [j.id for j in claimed] == batch
    c.results = {}
    for n, job_id in enumerate(batch[:2]):
        sums = {kind: storage.put_bytes(result_key(job_id, kind), _png(40 * n + k), "image/png")
                for k, kind in enumerate(("mask", "probability", "overlay"))}
        with svc.Session() as s:
            assert db.finish_success(s, job_id, "lease-1", 0.125 + n / 3, json.dumps(sums, sort_keys=True))
        c.results[job_id] = sums
    c.succeeded = batch[:2]
    with svc.Session() as s:
        assert db.finish_failure(s, batch[2], "lease-1", "ValueError: the slice is blank")
        db.heartbeat(s, [batch[3]], "lease-1", progress=55)
        user = admin_users.create_admin(s, "admin", "a long enough password")
        admin_users.start_session(s, user, timedelta(hours=8))
        admin_users.record_action(s, s.scalar(db.select(db.Job).where(db.Job.id == batch[2])), "admin", "retry")
        db.audit(s, "admin:admin", "job.retry", f"job:{batch[2]}", client="127.0.0.1")
        s.commit()
    c.failed, c.running = batch[2], batch[3]

    # studies: one finished with its files, one queued
    c.studies = []
    for status in ("succeeded", "queued"):
        sid = db.new_id()
        tar = os.urandom(4096)
        now = db.utcnow()
        with svc.Session() as s:
            st = db.Study(id=sid, token_id=c.token_id, status=status, queue=QUEUES["queue_bulk"], n_slices=3,
                          upload_fingerprint="f" * 64, input_key=study_input_key(sid),
                          input_sha256=storage.put_bytes(study_input_key(sid), tar, "application/x-tar"),
                          input_size=len(tar), input_format="dicom", deidentified=True,
                          meta=json.dumps({"modality": "CT", "n_slices": 3}), created_at=now, updated_at=now,
                          idempotency_key=f"study-{status}", dispatched_at=now)
            if status == "succeeded":
                report = json.dumps({"infected_fraction": 0.07, "slices": 3}).encode()
                sums = {"report.json": storage.put_bytes(study_result_key(sid, "report.json"), report,
                                                         "application/json"),
                        "overlays/0001.png": storage.put_bytes(study_result_key(sid, "overlays/0001.png"), _png(7),
                                                               "image/png")}
                st.report, st.result_checksums = report.decode(), json.dumps(sums, sort_keys=True)
                st.progress, st.attempts, st.started_at, st.finished_at = 100.0, 1, now, now
            s.add(st)
            s.commit()
        c.studies.append(sid)

    # objects beyond the service's own layout: other headers, user metadata, and one multipart-sized object
    storage.client.put_object(storage.bucket, "exports/2024/summary.csv", io.BytesIO(b"a,b\n1,2\n"), 8,
                              content_type="text/csv; charset=utf-8",
                              metadata={"x-amz-meta-owner": "ops", "Cache-Control": "no-cache"})
    big = os.urandom(6 * 1024 * 1024 + 123)
    storage.put_bytes("exports/big.bin", big, "application/octet-stream", metadata={"purpose": "multipart"})
    svc.engine.dispose()

    c.src_rows = all_rows(c.src_url)
    c.src_objects = all_objects(c.src)
    c.backup = tmp_path_factory.mktemp("bkp-dir") / "backup-1"
    c.pg_url = _fresh_pg(postgres_server, "backup_restored")
    c.pg = _settings(c, c.pg_url, "bkp-pg")
    return c


@pytest.fixture(scope="module")
def backup(ctx):
    rc, out, err = _cli(ctx, "service", "--database-url", ctx.src_url, "backup", "--out", ctx.backup,
                        "--bucket", "bkp-src")
    assert rc == 0, err
    assert "backup written to" in out and "objects" in out
    return json.loads((ctx.backup / "manifest.json").read_text()), out


@pytest.fixture(scope="module")
def restored_pg(ctx, backup):
    rc, out, err = _cli(ctx, "service", "restore", "--from", ctx.backup, "--database-url", ctx.pg_url,
                        "--bucket", "bkp-pg")
    assert rc == 0, err
    return out


# --- round trip ------------------------------------------------------------------------------------------------
def test_manifest_records_rows_objects_and_unfinished_work(ctx, backup):
    manifest, out = backup
    assert manifest["format"] == "covidseg-backup" and manifest["database"]["engine"] == "sqlite"
    assert manifest["alembic_revision"] == "0402_handbacks"
    tables = manifest["database"]["tables"]
    assert set(tables) == set(ctx.src_rows) and {n: t["rows"] for n, t in tables.items()} == \
        {n: len(rows) for n, rows in ctx.src_rows.items()}
    assert all(t["rows"] > 0 for t in tables.values())       # a realistic source: every table has rows
    nt = manifest["database"]["not_terminal"]
    assert {j["id"]: j["status"] for j in nt["jobs"]} == {ctx.running: "running", ctx.queued_job: "queued"}
    assert [s["id"] for s in nt["studies"]] == [ctx.studies[1]]
    index = [json.loads(line) for line in (ctx.backup / "objects.jsonl").read_text().splitlines()]
    assert {r["key"] for r in index} == set(ctx.src_objects)
    assert manifest["objects"]["count"] == len(index) and manifest["objects"]["bytes"] == sum(
        len(b) for b, _, _ in ctx.src_objects.values())
    for r in index:
        data, ctype, meta = ctx.src_objects[r["key"]]
        assert (ctx.backup / "objects" / r["key"]).read_bytes() == data
        assert r["content_type"] == ctype and {"x-amz-meta-" + k: v for k, v in r["metadata"].items()} == meta
    assert next(r for r in index if r["key"] == "exports/2024/summary.csv")["headers"] == \
        {"cache-control": "no-cache"}
    assert f"{len(index)} objects" in out and "2 jobs, 1 study" in out
    # the summary names the rows of every table
    assert all(f"{name} {len(rows)}" in out for name, rows in ctx.src_rows.items())


def test_restore_into_postgresql_keeps_every_row_and_object(ctx, restored_pg):
    assert "restored" in restored_pg and "queued again for the sweep to re-run: 2 jobs, 1 study" in restored_pg
    restored = all_rows(ctx.pg_url)
    expected = _expected_after_restore(ctx.src_rows)
    for name in expected:
        assert restored[name] == expected[name], name
    # the only differences from the source: the unfinished rows, queued again without lease or dispatch time
    jobs = {r["id"]: r for r in restored["jobs"]}
    assert jobs[ctx.running]["status"] == "queued" and jobs[ctx.running]["claim_token"] is None
    assert jobs[ctx.running]["attempts"] == 1 and jobs[ctx.running]["dispatched_at"] is None
    src_jobs = {r["id"]: r for r in ctx.src_rows["jobs"]}
    assert all(jobs[j] == src_jobs[j] for j in src_jobs if j not in (ctx.running, ctx.queued_job))
    assert all_objects(ctx.pg) == ctx.src_objects
    from shared.service.storage import Storage
    info = Storage.from_settings(ctx.pg).client.stat_object("bkp-pg", "exports/2024/summary.csv")
    assert info.metadata.get("Cache-Control") == "no-cache"      # other object headers come along too


def test_the_restored_stack_serves_jobs_results_and_studies_to_the_old_token(ctx, restored_pg):
    from api import create_app
    from shared.service import db
    app = create_app(ctx.pg)
    app.config["TESTING"] = True
    client = app.test_client()
    auth = {"Authorization": f"Bearer {ctx.token}"}
    try:
        for job_id in ctx.succeeded:
            body = client.get(f"/api/v1/jobs/{job_id}", headers=auth).get_json()
            assert body["status"] == "succeeded" and body["batch_id"] == ctx.batch_id
            for kind, sha in ctx.results[job_id].items():
                assert body["results"][kind]["sha256"] == sha
                r = client.get(f"/api/v1/jobs/{job_id}/results/{kind}", headers=auth)
                assert r.status_code == 200 and r.data == ctx.src_objects[f"results/{job_id}/{kind}.png"][0]
        assert client.get(f"/api/v1/jobs/{ctx.failed}", headers=auth).get_json()["error"].startswith("ValueError")
        b = client.get(f"/api/v1/batches/{ctx.batch_id}", headers=auth).get_json()
        assert b["total"] == 4 and b["counts"]["succeeded"] == 2 and b["counts"]["queued"] == 1
        st = client.get(f"/api/v1/studies/{ctx.studies[0]}", headers=auth).get_json()
        assert st["status"] == "succeeded" and st["report"]["slices"] == 3
        r = client.get(f"/api/v1/studies/{ctx.studies[0]}/files/report.json", headers=auth)
        assert r.status_code == 200 and json.loads(r.data)["infected_fraction"] == 0.07
        # revocation and scopes came along
        assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {ctx.revoked_token}"}).status_code == 401
        assert client.get("/api/v1/admin/jobs", headers={"Authorization": f"Bearer {ctx.admin_token}"}
                          ).status_code == 200
        # the sequences continue after the restored ids (PostgreSQL): a new upload and a new token
        r = client.post("/api/v1/jobs", headers=auth, content_type="multipart/form-data",
                        data={"file": [(io.BytesIO((SLICES / "covid_0300.png").read_bytes()), "after.png")]})
        assert r.status_code == 202, r.get_data(as_text=True)
        svc = app.extensions["covidseg"]
        with svc.Session() as s:
            new = s.scalar(db.select(db.Job).where(db.Job.id == r.get_json()["jobs"][0]["id"]))
            assert new.seq == max(j["seq"] for j in ctx.src_rows["jobs"]) + 1
            row, _ = db.create_token(s, "after-restore")
            assert row.id == max(t["id"] for t in ctx.src_rows["api_tokens"]) + 1
            s.rollback()
    finally:
        app.extensions["covidseg"].engine.dispose()


def test_the_sweep_republishes_what_was_unfinished(ctx, restored_pg):
    import redis

    from shared.service.celery_app import make_celery
    from shared.service.db import make_engine, make_sessionmaker
    from worker.sweep import sweep
    last = max(r["updated_at"] for r in ctx.src_rows["jobs"] + ctx.src_rows["studies"])
    wait = 2.2 - (datetime.now(timezone.utc) - last).total_seconds()
    if wait > 0:                      # the sweep publishes a never-dispatched row 2 s after its last update
        time.sleep(wait)
    engine = make_engine(ctx.pg)
    try:
        rep = sweep(ctx.pg, make_sessionmaker(engine), make_celery(ctx.pg), redis.Redis.from_url(ctx.broker))
    finally:
        engine.dispose()
    assert set(rep["published"]) == {ctx.running, ctx.queued_job}
    assert rep["studies_published"] == [ctx.studies[1]]
    assert rep["requeued"] == [] and rep["failed"] == []


def test_postgresql_backup_restores_into_sqlite(ctx, restored_pg, tmp_path):
    """And back: PostgreSQL -> SQLite, every row and object as in the PostgreSQL stack."""
    pg_rows, pg_objects = all_rows(ctx.pg_url), all_objects(ctx.pg)
    out_dir = tmp_path / "from-pg"
    rc, out, err = _cli(ctx, "service", "--database-url", ctx.pg_url, "backup", "--out", out_dir,
                        "--bucket", "bkp-pg")
    assert rc == 0, err
    assert json.loads((out_dir / "manifest.json").read_text())["database"]["engine"] == "postgresql"
    back_url = _fresh_sqlite(ctx.tmp, "bkp-back")
    rc, out, err = _cli(ctx, "service", "--database-url", back_url, "restore", "--from", out_dir,
                        "--bucket", "bkp-back")
    assert rc == 0, err
    assert all_rows(back_url) == _expected_after_restore(pg_rows)
    assert all_objects(_settings(ctx, back_url, "bkp-back")) == pg_objects


def test_backup_refuses_a_non_empty_directory_unless_forced(ctx, backup, tmp_path):
    d = tmp_path / "used"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    rc, out, err = _cli(ctx, "service", "--database-url", ctx.src_url, "backup", "--out", d,
                        "--bucket", "bkp-src")
    assert rc == 2 and err.startswith("error: ") and "not empty" in err and "--force" in err
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    rc, out, err = _cli(ctx, "service", "--database-url", ctx.src_url, "backup", "--out", d,
                        "--bucket", "bkp-src", "--force")
    assert rc == 0, err
    assert (d / "notes.txt").read_text() == "keep me" and (d / "manifest.json").is_file()


# --- refusals --------------------------------------------------------------------------------------------------
def test_restore_refuses_a_non_empty_database(ctx, backup):
    rc, _, err = _cli(ctx, "service", "--database-url", ctx.src_url, "restore", "--from", ctx.backup,
                      "--bucket", "bkp-never")
    assert rc == 2 and err.startswith("error: the target database is not empty (") and "api_tokens: 3 rows" in err
    assert "Traceback" not in err


def test_restore_refuses_another_schema_revision(ctx, backup):
    old = _fresh_sqlite(ctx.tmp, "bkp-old", revision="0301_retry_history")
    rc, _, err = _cli(ctx, "service", "--database-url", old, "restore", "--from", ctx.backup,
                      "--bucket", "bkp-never")
    assert rc == 2 and err.startswith("error: the backup is at schema revision 0402_handbacks, the "
                                      "target database at 0301_retry_history")
    empty = f"sqlite:///{ctx.tmp.mktemp('bkp-unmigrated') / 'x.db'}"
    rc, _, err = _cli(ctx, "service", "--database-url", empty, "restore", "--from", ctx.backup,
                      "--bucket", "bkp-never")
    assert rc == 2 and "not migrated" in err and "covidseg service migrate" in err


def test_restore_refuses_a_corrupted_object_and_writes_nothing(ctx, backup, tmp_path):
    from shared.service.storage import Storage
    damaged = tmp_path / "damaged"
    shutil.copytree(ctx.backup, damaged)
    key = f"results/{ctx.succeeded[0]}/mask.png"
    p = damaged / "objects" / key
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    url = _fresh_sqlite(ctx.tmp, "bkp-corrupt")
    rc, _, err = _cli(ctx, "service", "--database-url", url, "restore", "--from", damaged,
                      "--bucket", "bkp-corrupt")
    assert rc == 2 and _last_line(err).startswith(f"error: object {key}: checksum mismatch")
    assert all(rows == [] for rows in all_rows(url).values())
    st = Storage.from_settings(_settings(ctx, url, "bkp-corrupt"))
    assert not st.client.bucket_exists("bkp-corrupt") or st.list_keys() == []
    # a damaged table dump is refused the same way
    (damaged / "objects" / key).write_bytes(ctx.src_objects[key][0])
    with open(damaged / "db" / "jobs.jsonl", "a") as f:
        f.write("\n")
    rc, _, err = _cli(ctx, "service", "--database-url", url, "restore", "--from", damaged,
                      "--bucket", "bkp-corrupt")
    assert rc == 2 and "the dump of table jobs" in err and "checksum" in err


def test_restore_refuses_a_non_empty_bucket_unless_forced(ctx, restored_pg):
    url = _fresh_sqlite(ctx.tmp, "bkp-busy")
    rc, _, err = _cli(ctx, "service", "--database-url", url, "restore", "--from", ctx.backup,
                      "--bucket", "bkp-pg")
    assert rc == 2 and "bucket 'bkp-pg' is not empty" in err and "--force" in err
    assert all(rows == [] for rows in all_rows(url).values())
    rc, _, err = _cli(ctx, "service", "--database-url", url, "restore", "--from", ctx.backup, "--bucket", "bkp-pg",
                      "--force")                    # same keys, same bytes: overwritten in place
    assert rc == 0, err
    assert all_rows(url) == _expected_after_restore(ctx.src_rows)


def test_restore_of_a_missing_directory_is_a_clear_error(tmp_path):
    """The real console path (a subprocess): `error: ...`, exit 2, no traceback."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", COVIDSEG_DATABASE_URL=f"sqlite:///{tmp_path / 'x.db'}")
    for name, argv in (("missing", ["--from", tmp_path / "nope"]), ("not a backup", ["--from", tmp_path])):
        p = subprocess.run([sys.executable, "-m", "cli", "service", "restore", *map(str, argv)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (name, p.stderr)
        assert p.stderr.startswith("error: no backup at ") and "Traceback" not in p.stderr, name
    assert not (tmp_path / "x.db").exists()   # refused before connecting anywhere


# --- units -----------------------------------------------------------------------------------------------------
def test_values_round_trip_through_json():
    from cli.backup import decode_value, encode_value
    values = [None, True, 0, -(2 ** 62), 0.1, 1e-300, "", "ümlaut ✓", datetime(2024, 2, 29, 23, 59, 59, 999999,
              tzinfo=timezone.utc), datetime(2024, 1, 1, 12, 0), b"", b"\x00\xffbytes", Decimal("1.10")]
    for v in values:
        back = decode_value(json.loads(json.dumps(encode_value(v))))
        assert back == v and type(back) is type(v), v
    assert math.isnan(decode_value(json.loads(json.dumps(encode_value(float("nan"))))))
    assert decode_value(encode_value(float("-inf"))) == float("-inf")
    with pytest.raises(ValueError):
        decode_value({"$unknown": 1})


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../x", "/abs", "a//b", "./a", "", "a/\x00"])
def test_object_keys_never_leave_the_directory(tmp_path, key):
    from cli import CLIError
    from cli.backup import object_path
    with pytest.raises(CLIError):
        object_path(tmp_path / "objects", key)
    assert object_path(tmp_path / "objects", "studies/x/results/overlays/0001.png").is_relative_to(tmp_path)


def test_bytes_datetimes_and_nulls_round_trip_between_engines(tmp_path, postgres_server):
    """A probe table with a column of every kind: SQLite -> PostgreSQL -> SQLite through dump/load."""
    from sqlalchemy import (BigInteger, Boolean, Column, Float, Integer, LargeBinary, MetaData, String, Table, Text,
                            insert, select)

    from cli.backup import dump_database, load_database, reset_sequences
    from shared.service.db import UTCDateTime, make_engine
    md = MetaData()
    probe = Table("backup_probe", md, Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
                  Column("blob", LargeBinary), Column("at", UTCDateTime), Column("x", Float),
                  Column("flag", Boolean), Column("name", String(50)), Column("body", Text))
    rows = [{"id": 1, "blob": bytes(range(256)), "at": datetime(2024, 5, 1, 8, 30, 0, 123456, tzinfo=timezone.utc),
             "x": 1 / 3, "flag": True, "name": "ä", "body": "x" * 5000},
            {"id": 7, "blob": None, "at": None, "x": None, "flag": None, "name": None, "body": None},
            {"id": 9, "blob": b"", "at": datetime(1970, 1, 1, tzinfo=timezone.utc), "x": -0.0, "flag": False,
             "name": "", "body": ""}]
    urls = [f"sqlite:///{tmp_path / 'a.db'}", postgres_server.create_database("backup_probe"),
            f"sqlite:///{tmp_path / 'b.db'}"]
    engines = [make_engine(u) for u in urls]
    try:
        for e in engines:
            md.create_all(e)
        with engines[0].begin() as conn:
            conn.execute(insert(probe), rows)
        for i, (src, dst) in enumerate(zip(engines, engines[1:])):
            root = tmp_path / f"hop{i}"
            info = dump_database(src, root / "db", [probe])
            with dst.begin() as conn:
                assert load_database(conn, root, {"database": info}, [probe]) == {"backup_probe": 3}
                reset_sequences(conn, [probe])
            with dst.connect() as conn:
                assert [dict(r) for r in conn.execute(select(probe).order_by(probe.c.id)).mappings()] == rows
        with engines[1].begin() as conn:     # the PostgreSQL sequence continues after the restored ids
            assert conn.execute(insert(probe).values(name="next").returning(probe.c.id)).scalar() == 10
    finally:
        for e in engines:
            e.dispose()


@pytest.mark.parametrize("engine_name", ["sqlite", "postgresql"])
def test_the_dump_is_one_snapshot(tmp_path, postgres_server, engine_name):
    """A row committed by another connection while the dump runs (after the first table) is not in it: every
    table is read from the same snapshot (a job's row and its batch, say, always agree)."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert

    from cli.backup import dump_database
    from shared.service.db import make_engine
    md = MetaData()
    first, second = (Table(n, md, Column("id", Integer, primary_key=True)) for n in ("snap_a", "snap_b"))
    url = (f"sqlite:///{tmp_path / 'snap.db'}" if engine_name == "sqlite"
           else postgres_server.create_database("backup_snapshot"))
    engine, writer = make_engine(url), make_engine(url)

    class Tables(list):
        """Commits a row into snap_b from another connection once the dump has read snap_a."""
        loops = 0

        def __iter__(self):
            Tables.loops += 1
            for i, t in enumerate(list.__iter__(self)):
                if i == 1 and Tables.loops == 2:   # the dump's loop, between the two tables
                    with writer.begin() as conn:
                        conn.execute(insert(second).values(id=2))
                yield t
    try:
        md.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(first).values(id=1))
            conn.execute(insert(second).values(id=1))
        info = dump_database(engine, tmp_path / "db", Tables([first, second]))
        assert Tables.loops == 2
        assert {n: t["rows"] for n, t in info["tables"].items()} == {"snap_a": 1, "snap_b": 1}
        assert (tmp_path / "db" / "snap_b.jsonl").read_text() == '{"id":1}\n'
    finally:
        engine.dispose()
        writer.dispose()
