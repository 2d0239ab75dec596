"""`covidseg service backup` / `covidseg service restore`: the job database and the bucket, to and from a directory.

    covidseg service [--database-url URL] backup --out DIR [--bucket NAME] [--force]
    covidseg service [--database-url URL] restore --from DIR [--bucket NAME] [--force]

Layout of DIR (nothing is ever written outside it):

    manifest.json        format, alembic revision, source engine and bucket, per table: columns, rows, sha256 of
                         its dump; objects: count, bytes, sha256 of objects.jsonl; the jobs and studies that were
                         not finished (queued/running) at backup time. Written last: no manifest = no backup.
    db/<table>.jsonl     one JSON object per row, in primary-key order. Values are JSON; datetimes, bytes,
                         decimals and non-finite floats are tagged ({"$datetime": ISO-8601}, {"$bytes": base64},
                         ...), NULL is null: the dump is engine-neutral (SQLite -> PostgreSQL and back).
    objects.jsonl        one line per object: key, size, sha256, content_type, metadata (user metadata, without
                         the x-amz-meta- prefix), headers (cache-control etc., when set)
    objects/<key>        the object's bytes

Consistency: the database is read first, in ONE snapshot (REPEATABLE READ on PostgreSQL, one read transaction on
SQLite), then the bucket is copied. Every job/study row that is terminal in the dump therefore has its result
objects in the bucket copy (results are written before a row becomes succeeded, and never deleted). Rows that
were queued or running may have partial results: restore puts them back to `queued` (lease cleared, not
dispatched), and the recovery sweep of the restored stack re-publishes them, so they run again.

Restore refuses (exit 2, nothing written) unless the target database is migrated to the backup's alembic
revision and empty, every dump file and every object matches its recorded SHA-256, and the bucket is empty (or
--force: objects with the same keys are overwritten). It uploads the objects first, then inserts every row in one
transaction (foreign-key order) and moves PostgreSQL sequences past the restored ids; a failed restore leaves
the database empty, so it can simply be run again with --force.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import shutil
import sys
from datetime import date, datetime, time, timezone
from decimal import Decimal
from pathlib import Path

FORMAT = "covidseg-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
OBJECTS_INDEX = "objects.jsonl"
DB_DIR = "db"
OBJECTS_DIR = "objects"
_TMP_DIR = ".incoming"
#: What a backup writes into DIR (--force removes exactly these first).
_OWN_ENTRIES = (MANIFEST, OBJECTS_INDEX, DB_DIR, OBJECTS_DIR, _TMP_DIR)
#: Object headers kept besides Content-Type and the user metadata (when the source sets them).
_KEPT_HEADERS = ("cache-control", "content-disposition", "content-encoding", "content-language")
_META_PREFIX = "x-amz-meta-"
_CHUNK = 1024 * 1024
_ROWS_PER_INSERT = 1000


def register_service_commands(ssub) -> None:
    """Add `backup` and `restore` to the sub-commands of `covidseg service` (cli/service.py)."""
    common = dict(formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__)
    b = ssub.add_parser("backup", help="copy the job database and the bucket into a directory", **common)
    b.add_argument("--out", required=True, metavar="DIR", help="directory to write (created; must be empty)")
    b.add_argument("--bucket", default=None, help="bucket to copy (default: COVIDSEG_S3_BUCKET)")
    b.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR (a previous backup's files in it are replaced)")
    b.add_argument("--database-url", default=argparse.SUPPRESS,
                   help="SQLAlchemy URL (default: COVIDSEG_DATABASE_URL)")
    b.set_defaults(func=cmd_backup)
    r = ssub.add_parser("restore", help="restore a backup into an empty, migrated database and a bucket", **common)
    r.add_argument("--from", dest="from_dir", required=True, metavar="DIR", help="a directory made by backup")
    r.add_argument("--bucket", default=None, help="bucket to fill (default: COVIDSEG_S3_BUCKET; created)")
    r.add_argument("--force", action="store_true",
                   help="restore into a bucket that already holds objects (same keys are overwritten)")
    r.add_argument("--database-url", default=argparse.SUPPRESS,
                   help="SQLAlchemy URL (default: COVIDSEG_DATABASE_URL)")
    r.set_defaults(func=cmd_restore)


# --- values <-> JSON ---------------------------------------------------------------------------------------------
def encode_value(v):
    """A database value as JSON: plain for None/bool/int/str/finite floats, tagged otherwise."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, datetime):
        return {"$datetime": v.isoformat()}
    if isinstance(v, date):
        return {"$date": v.isoformat()}
    if isinstance(v, time):
        return {"$time": v.isoformat()}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, Decimal):
        return {"$decimal": str(v)}
    raise TypeError(f"cannot back up a value of type {type(v).__name__}")


_DECODERS = {"$float": float, "$datetime": datetime.fromisoformat, "$date": date.fromisoformat,
             "$time": time.fromisoformat, "$bytes": base64.b64decode, "$decimal": Decimal}


def decode_value(v):
    if isinstance(v, dict):
        if len(v) == 1:
            (tag, raw), = v.items()
            if tag in _DECODERS:
                return _DECODERS[tag](raw)
        raise ValueError(f"unknown tagged value {v!r}")
    return v


# --- helpers -----------------------------------------------------------------------------------------------------
def _error(message: str, code: int = 2):
    from cli import CLIError
    return CLIError(message, code)


def _settings(args):
    from cli.service import _settings_of
    s = _settings_of(args)
    return s.replace(s3_bucket=args.bucket) if getattr(args, "bucket", None) else s


def _tables():
    """Every table of the schema, parents before children (foreign-key order)."""
    import shared.service.admin_users  # noqa: F401 - registers the admin tables in Base.metadata
    from shared.service.db import Base
    return list(Base.metadata.sorted_tables)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return "(database)"


def object_path(objects_dir: Path, key: str) -> Path:
    """DIR/objects/<key>, refusing keys that are not a plain relative path (never a path outside DIR)."""
    parts = key.split("/")
    if (not key or "\x00" in key or any(p in ("", ".", "..") for p in parts)
            or any(len(p.encode("utf-8")) > 255 for p in parts)):
        raise _error(f"object key {key!r} cannot be stored as a file (empty, '.' or '..' path segment)")
    path = objects_dir.joinpath(*parts)
    if not path.resolve().is_relative_to(objects_dir.resolve()):
        raise _error(f"object key {key!r} would leave the backup directory")
    return path


def _sha256_file(path: Path, bar=None) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest(), n


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _head_revision() -> str | None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    root = Path(__file__).resolve().parents[1]
    return ScriptDirectory.from_config(Config(str(root / "alembic.ini"))).get_current_head()


def _db_revision(conn) -> str | None:
    from sqlalchemy import inspect, text
    if not inspect(conn).has_table("alembic_version"):
        return None
    revs = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return ",".join(sorted(revs)) or None


def _services_errors():
    import urllib3
    from minio.error import S3Error
    from sqlalchemy.exc import OperationalError

    from shared.service.storage import StorageError
    return OperationalError, (S3Error, StorageError, urllib3.exceptions.HTTPError, OSError)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# --- backup ------------------------------------------------------------------------------------------------------
def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise _error(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise _error(f"--out {out} is not empty; choose a new directory or pass --force to replace it")
        for name in _OWN_ENTRIES:
            p = out / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
    out.mkdir(parents=True, exist_ok=True)


def dump_database(engine, db_dir: Path, tables) -> dict:
    """Every row of `tables` into db_dir/<table>.jsonl, from one snapshot. Returns the manifest's database part."""
    from sqlalchemy import inspect, select

    from shared.service.db import TERMINAL
    db_dir.mkdir(parents=True, exist_ok=True)
    info = {"engine": engine.dialect.name, "tables": {}, "not_terminal": {}, "skipped_tables": []}
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        elif engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN")   # one read transaction = one snapshot (WAL) for every table
        info["alembic_revision"] = _db_revision(conn)
        known = {t.name for t in tables} | {"alembic_version"}
        info["skipped_tables"] = sorted(set(inspect(conn).get_table_names()) - known)
        for t in tables:
            cols = [c.name for c in t.columns]
            path = db_dir / f"{t.name}.jsonl"
            h, n = hashlib.sha256(), 0
            unfinished = []
            result = conn.execution_options(stream_results=True, yield_per=_ROWS_PER_INSERT).execute(
                select(t).order_by(*t.primary_key.columns))
            with open(path, "wb") as f:
                for row in result.mappings():
                    line = (json.dumps({c: encode_value(row[c]) for c in cols}, ensure_ascii=False,
                                       separators=(",", ":")) + "\n").encode("utf-8")
                    f.write(line)
                    h.update(line)
                    n += 1
                    if "status" in cols and "id" in cols and t.name in ("jobs", "studies") \
                            and row["status"] not in TERMINAL:
                        unfinished.append({"id": row["id"], "status": row["status"]})
            info["tables"][t.name] = {"file": f"{DB_DIR}/{t.name}.jsonl", "rows": n, "sha256": h.hexdigest(),
                                      "columns": cols}
            if t.name in ("jobs", "studies"):
                info["not_terminal"][t.name] = unfinished
        conn.rollback()
    return info


def _object_headers(headers) -> tuple[str | None, dict, dict]:
    content_type, meta, kept = None, {}, {}
    for k, v in headers.items():
        low = k.lower()
        if low == "content-type":
            content_type = v
        elif low.startswith(_META_PREFIX):
            meta[low[len(_META_PREFIX):]] = v
        elif low in _KEPT_HEADERS:
            kept[low] = v
    return content_type, dict(sorted(meta.items())), dict(sorted(kept.items()))


def dump_objects(storage, out: Path) -> dict:
    """Every object of the bucket into out/objects/<key>, indexed in out/objects.jsonl."""
    import warnings

    from minio.error import S3Error
    from tqdm import tqdm
    client, bucket = storage.client, storage.bucket
    if not client.bucket_exists(bucket):
        raise _error(f"bucket {bucket!r} does not exist at {storage.settings.s3_endpoint}")
    listing = sorted((o.object_name, o.size or 0) for o in client.list_objects(bucket, recursive=True)
                     if not o.is_dir)
    objects_dir, tmp_dir = out / OBJECTS_DIR, out / _TMP_DIR
    objects_dir.mkdir(exist_ok=True)
    tmp_dir.mkdir(exist_ok=True)
    count = total = 0
    vanished = []
    index_hash = hashlib.sha256()
    with open(out / OBJECTS_INDEX, "wb") as index, \
            tqdm(total=sum(s for _, s in listing), desc="objects", unit="B", unit_scale=True, unit_divisor=1024,
                 file=sys.stderr, disable=not listing, mininterval=0.5) as bar:
        for key, _size in listing:
            path = object_path(objects_dir, key)
            tmp = tmp_dir / "object"
            try:
                resp = client.get_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject"):   # deleted since the listing
                    vanished.append(key)
                    continue
                raise
            h, n = hashlib.sha256(), 0
            try:
                content_type, meta, kept = _object_headers(resp.headers)
                with open(tmp, "wb") as f:
                    for chunk in resp.stream(_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        n += len(chunk)
                        bar.update(len(chunk))
            finally:
                resp.close()
                resp.release_conn()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
            except OSError as exc:
                raise _error(f"object key {key!r} cannot be stored as {path} ({exc.strerror}: a key is also "
                             "the prefix of other keys)") from None
            digest = h.hexdigest()
            if meta.get("sha256") and meta["sha256"] != digest:
                warnings.warn(f"object {key}: its bytes do not match its sha256 metadata (copied as they are)")
            line = (json.dumps({"key": key, "size": n, "sha256": digest, "content_type": content_type,
                                "metadata": meta, **({"headers": kept} if kept else {})},
                               ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
            index.write(line)
            index_hash.update(line)
            count += 1
            total += n
    tmp_dir.rmdir()
    return {"bucket": bucket, "index": OBJECTS_INDEX, "count": count, "bytes": total,
            "index_sha256": index_hash.hexdigest(), "vanished_during_backup": vanished}


def cmd_backup(args) -> int:
    from shared.service.db import make_engine
    from shared.service.storage import Storage
    db_errors, s3_errors = _services_errors()
    out = Path(args.out)
    s = _settings(args)
    tables = _tables()
    engine = make_engine(s)
    try:
        with engine.connect() as conn:
            rev = _db_revision(conn)
        head = _head_revision()
        if rev != head:
            raise _error(f"the database {_safe_url(s.database_url)} is at schema revision {rev or '(none)'}, this "
                         f"covidseg expects {head}: run `covidseg service migrate` first")
        _prepare_out(out, args.force)
        started = datetime.now(timezone.utc)
        database = dump_database(engine, out / DB_DIR, tables)   # first the rows (one snapshot) ...
    except db_errors as exc:
        raise _error(f"database {_safe_url(s.database_url)}: {exc.orig or exc}", 1) from None
    finally:
        engine.dispose()
    try:
        objects = dump_objects(Storage.from_settings(s), out)   # ... then the objects (a superset of theirs)
    except s3_errors as exc:
        raise _error(f"object storage {s.s3_endpoint}, bucket {s.s3_bucket}: {exc}", 1) from None
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "created_at": started.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(),
                "alembic_revision": database.pop("alembic_revision"), "database": database, "objects": objects}
    _write_json_atomic(out / MANIFEST, manifest)
    nt = database["not_terminal"]
    for name in database["skipped_tables"]:
        print(f"warning: table {name} is not part of the covidseg schema and was not backed up", file=sys.stderr)
    print(f"backup written to {out}: {_rows_summary(database['tables'])}; {objects['count']} objects, "
          f"{_human(objects['bytes'])} ({objects['bytes']} bytes); not finished at backup time (re-run after a "
          f"restore): {_count(len(nt.get('jobs', [])), 'job')}, {_count(len(nt.get('studies', [])), 'study')}")
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what[:-1] + 'ies' if what.endswith('y') else what + 's'}"


def _rows_summary(tables: dict) -> str:
    total = sum(t["rows"] for t in tables.values())
    return f"{total} rows (" + ", ".join(f"{name} {t['rows']}" for name, t in tables.items()) + ")"


# --- restore -----------------------------------------------------------------------------------------------------
def load_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise _error(f"no backup at {root}: the directory does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise _error(f"no backup at {root}: {MANIFEST} is missing (an incomplete or foreign directory)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _error(f"{path} is not a readable manifest: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _error(f"{path} is not a covidseg backup manifest")
    if m.get("version") != FORMAT_VERSION:
        raise _error(f"{path} has backup format version {m.get('version')}; this covidseg reads version "
                     f"{FORMAT_VERSION}")
    return m


def _objects_index(root: Path, manifest: dict) -> list[dict]:
    obj = manifest["objects"]
    path = root / obj["index"]
    if not path.is_file():
        raise _error(f"{path} is missing")
    digest, _ = _sha256_file(path)
    if digest != obj["index_sha256"]:
        raise _error(f"{path} does not match its checksum in {MANIFEST} (the backup is damaged)")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(recs) != obj["count"]:
        raise _error(f"{path} lists {len(recs)} objects, {MANIFEST} says {obj['count']}")
    return recs


def verify_backup(root: Path, manifest: dict) -> list[dict]:
    """Check every dump file and every object against its recorded size and SHA-256; returns the object index."""
    from tqdm import tqdm
    for name, t in manifest["database"]["tables"].items():
        path = root / t["file"]
        if not path.resolve().is_relative_to(root.resolve()) or not path.is_file():
            raise _error(f"the dump of table {name} ({path}) is missing")
        if _sha256_file(path)[0] != t["sha256"]:
            raise _error(f"the dump of table {name} ({path}) does not match its checksum (the backup is damaged)")
    recs = _objects_index(root, manifest)
    objects_dir = root / OBJECTS_DIR
    with tqdm(total=sum(r["size"] for r in recs), desc="verify", unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not recs, mininterval=0.5, leave=False) as bar:
        for r in recs:
            path = object_path(objects_dir, r["key"])
            if not path.is_file():
                raise _error(f"object {r['key']} is missing from the backup ({path})")
            digest, n = _sha256_file(path, bar)
            if n != r["size"] or digest != r["sha256"]:
                raise _error(f"object {r['key']}: checksum mismatch ({path} has {n} bytes, sha256 {digest[:12]}...; "
                             f"the manifest says {r['size']} bytes, {r['sha256'][:12]}...): the backup is damaged")
    return recs


def check_target_database(conn, manifest: dict, tables) -> None:
    """Refuse unless the database is migrated to the backup's revision, has the backup's columns and is empty."""
    from sqlalchemy import func, select
    want = manifest["alembic_revision"]
    rev = _db_revision(conn)
    if rev is None:
        raise _error("the target database is not migrated (no alembic_version): run `covidseg service migrate`, "
                     "then restore")
    if rev != want:
        raise _error(f"the backup is at schema revision {want}, the target database at {rev}: restore needs the "
                     f"same revision (migrate a fresh database to {want}, restore, then `covidseg service migrate`)")
    dumped = manifest["database"]["tables"]
    by_name = {t.name: t for t in tables}
    unknown = sorted(set(dumped) - set(by_name))
    if unknown:
        raise _error(f"the backup has tables this covidseg does not know: {', '.join(unknown)}")
    for name, t in dumped.items():
        have = [c.name for c in by_name[name].columns]
        if set(t["columns"]) != set(have):
            raise _error(f"table {name}: the backup has columns {sorted(t['columns'])}, this covidseg {sorted(have)}; "
                         "restore with the covidseg version that made the backup")
    full = {t.name: n for t in tables if (n := conn.execute(select(func.count()).select_from(t)).scalar())}
    if full:
        raise _error("the target database is not empty (" + ", ".join(f"{k}: {v} rows" for k, v in full.items())
                     + "): restore needs a freshly migrated, empty database")


def _requeue(row: dict) -> dict:
    """A job/study that was queued or running at backup time, as the sweep re-publishes it: queued, no lease,
    never dispatched (its partial results are overwritten by the re-run)."""
    from shared.service.db import ACTIVE, QUEUED
    if row.get("status") in ACTIVE:
        row.update(status=QUEUED, claim_token=None, progress=0, dispatched_at=None)
    return row


def load_database(conn, root: Path, manifest: dict, tables) -> dict:
    """Insert every dumped row, parents first (in the caller's transaction); returns {table: rows}."""
    counts = {}
    dumped = manifest["database"]["tables"]
    for t in tables:
        if t.name not in dumped:
            continue
        n, batch = 0, []
        with open(root / dumped[t.name]["file"], encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = {k: decode_value(v) for k, v in json.loads(line).items()}
                if t.name in ("jobs", "studies"):
                    row = _requeue(row)
                batch.append(row)
                if len(batch) >= _ROWS_PER_INSERT:
                    conn.execute(t.insert(), batch)
                    n += len(batch)
                    batch = []
        if batch:
            conn.execute(t.insert(), batch)
            n += len(batch)
        if n != dumped[t.name]["rows"]:
            raise _error(f"table {t.name}: read {n} rows, the manifest says {dumped[t.name]['rows']}")
        counts[t.name] = n
    return counts


def reset_sequences(conn, tables) -> None:
    """PostgreSQL: each serial/identity column's sequence continues after the largest restored id."""
    from sqlalchemy import Integer, text
    if conn.dialect.name != "postgresql":
        return   # SQLite's INTEGER PRIMARY KEY continues from max(rowid) by itself
    for t in tables:
        pk = list(t.primary_key.columns)
        if len(pk) != 1 or not isinstance(pk[0].type, Integer):
            continue
        col = pk[0].name
        seq = conn.execute(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": t.name, "c": col}).scalar()
        if seq:
            conn.execute(text(f'SELECT setval(CAST(:s AS regclass), COALESCE((SELECT MAX("{col}") FROM "{t.name}"), 0)'
                              " + 1, false)"), {"s": seq})


def restore_objects(storage, root: Path, recs: list[dict], force: bool) -> int:
    from tqdm import tqdm
    client, bucket = storage.client, storage.bucket
    storage.ensure_bucket()
    if not force and next(iter(client.list_objects(bucket, recursive=True)), None) is not None:
        raise _error(f"bucket {bucket!r} is not empty: restore into a new bucket (--bucket NAME) or pass --force "
                     "to overwrite objects with the same keys")
    total = 0
    objects_dir = root / OBJECTS_DIR
    with tqdm(total=sum(r["size"] for r in recs), desc="objects", unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, disable=not recs, mininterval=0.5) as bar:
        for r in recs:
            headers = {_META_PREFIX + k: v for k, v in (r.get("metadata") or {}).items()}
            headers.update(r.get("headers") or {})
            with open(object_path(objects_dir, r["key"]), "rb") as f:
                client.put_object(bucket, r["key"], f, r["size"],
                                  content_type=r.get("content_type") or "application/octet-stream",
                                  metadata=headers or None)
            bar.update(r["size"])
            total += r["size"]
    return total


def cmd_restore(args) -> int:
    from shared.service.db import make_engine
    from shared.service.storage import Storage
    db_errors, s3_errors = _services_errors()
    root = Path(args.from_dir)
    manifest = load_manifest(root)
    s = _settings(args)
    tables = _tables()
    engine = make_engine(s)
    try:
        try:
            with engine.connect() as conn:
                check_target_database(conn, manifest, tables)       # refuse before anything is written ...
        except db_errors as exc:
            raise _error(f"database {_safe_url(s.database_url)}: {exc.orig or exc}", 1) from None
        recs = verify_backup(root, manifest)                         # ... or when the backup is damaged
        try:
            nbytes = restore_objects(Storage.from_settings(s), root, recs, args.force)
        except s3_errors as exc:
            raise _error(f"object storage {s.s3_endpoint}, bucket {s.s3_bucket}: {exc}", 1) from None
        try:
            with engine.begin() as conn:                              # all rows or none
                check_target_database(conn, manifest, tables)
                counts = load_database(conn, root, manifest, tables)
                reset_sequences(conn, tables)
        except db_errors as exc:
            raise _error(f"database {_safe_url(s.database_url)}: {exc.orig or exc}", 1) from None
    finally:
        engine.dispose()
    nt = manifest["database"].get("not_terminal", {})
    print(f"restored {root} into {_safe_url(s.database_url)} and bucket {s.s3_bucket}: "
          f"{_rows_summary({k: {'rows': v} for k, v in counts.items()})}; {len(recs)} objects, {_human(nbytes)} "
          f"({nbytes} bytes); queued again for the sweep to re-run: {_count(len(nt.get('jobs', [])), 'job')}, "
          f"{_count(len(nt.get('studies', [])), 'study')}")
    return 0
