"""The JSON records of the bulk client (cli.bulk), rewritten atomically (temporary file + fsync + rename) after
every state change, so a crash leaves either the old or the new version:
* `Manifest`   - what `submit` did (default ./covidseg-manifest.json), keyed by each study's path relative to the
  submitted folder: Idempotency-Key, state, server study id, last error; running the same `submit` again resumes
  from it;
* `FetchState` - what `fetch` downloaded into one output folder (OUT/.covidseg-fetch.json), keyed by server study
  id, with the SHA-256 of every downloaded file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from cli import CLIError

DEFAULT_MANIFEST = "covidseg-manifest.json"
MANIFEST_FORMAT = "covidseg-bulk-manifest"
MANIFEST_VERSION = 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class JsonRecord:
    """A JSON file holding per-study entries, rewritten atomically (temporary file + fsync + rename) after every
    change, so a crash leaves either the old or the new version. Thread-safe."""

    FORMAT = "covidseg-json-record"

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data
        self.lock = threading.RLock()
        self._lockfile = None

    @classmethod
    def load(cls, path: Path, missing_hint: str = ""):
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CLIError(f"{path} not found{missing_hint}") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CLIError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT or \
                not isinstance(data.get("studies"), dict):
            raise CLIError(f"{path} is not a {cls.FORMAT} file")
        if data.get("version", 0) > MANIFEST_VERSION:
            raise CLIError(f"{path} was written by a newer covidseg (version {data['version']})")
        return cls(path, data)

    @classmethod
    def new(cls, path: Path, **fields):
        rec = cls(path, {"format": cls.FORMAT, "version": MANIFEST_VERSION, **fields, "created_at": _now(),
                         "updated_at": _now(), "studies": {}})
        rec.save()
        return rec

    def lock_exclusive(self, what: str) -> None:
        """Refuse a second process on the same file (the lock dies with the process, even on kill -9)."""
        import fcntl
        f = open(str(self.path) + ".lock", "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise CLIError(f"another covidseg {what} is using {self.path}") from None
        self._lockfile = f

    @property
    def studies(self) -> dict:
        return self.data["studies"]

    def update(self, entry_id: str, /, **fields) -> dict:
        """Set fields of one study's entry and save; returns a copy of the entry."""
        with self.lock:
            entry = self.studies.setdefault(entry_id, {})
            entry.update(fields)
            entry["updated_at"] = _now()
            self.save()
            return dict(entry)

    def save(self) -> None:
        with self.lock:
            self.data["updated_at"] = _now()
            text = json.dumps(self.data, indent=1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix="." + self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            with contextlib.suppress(OSError):   # make the rename itself durable
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)


class Manifest(JsonRecord):
    """What `submit` did, keyed by each study's path relative to the submitted folder: name, kind, digest,
    Idempotency-Key, state (pending | uploading | accepted | rejected), server study id, last error."""

    FORMAT = MANIFEST_FORMAT

    @classmethod
    def open_or_create(cls, path: Path, root: Path, server: str) -> "Manifest":
        path = Path(path)
        if not path.exists():
            return cls.new(path, root=str(root), server=server)
        m = cls.load(path)
        if m.data.get("root") != str(root):
            raise CLIError(f"manifest {path} belongs to folder {m.data.get('root')}, not {root}; "
                           "use another --manifest for this folder")
        if m.data.get("server") != server:
            raise CLIError(f"manifest {path} records studies on {m.data.get('server')}, not {server}; "
                           "use another --manifest for this server")
        return m


class FetchState(JsonRecord):
    """What `fetch` downloaded into one output folder (OUT/.covidseg-fetch.json), keyed by server study id:
    name, last status, progress, key report numbers and the SHA-256 of every downloaded file. Kept apart from
    the manifest so that `fetch --wait` can run while `submit` is still uploading."""

    FORMAT = "covidseg-fetch-state"
    FILENAME = ".covidseg-fetch.json"
