"""Object storage through the `minio` client (MinIO, SeaweedFS, AWS S3).

Bucket layout (one bucket, `COVIDSEG_S3_BUCKET`); keys are generated, never derived from client file names:

    inputs/<job_id>                 the uploaded bytes, as received (metadata: sha256, format, sanitised name)
    results/<job_id>/mask.png       {0,255} mask at the input's size
    results/<job_id>/probability.png 8-bit probability map
    results/<job_id>/overlay.png    heat-map overlay

Whole studies (api/studies.py, worker/study_tasks.py) live under one prefix per study:

    studies/<study_id>/input.tar        the normalised input: de-identified NNNN.dcm files of one series, or
                                        volume.nii.gz (an uncompressed tar, written once by the API)
    studies/<study_id>/upload           the upload as received: ONLY when COVIDSEG_STUDY_DEIDENTIFY is off
                                        (identifying data is never stored)
    studies/<study_id>/results/...     mask.nii.gz, lung_mask.nii.gz, [mask.seg.dcm,] report.json, summary.png, overlays/NNNN.png

Every object carries its SHA-256 as user metadata (`x-amz-meta-sha256`); the job row records the same sums, and
the worker verifies an input's checksum before using it. A worker re-run writes the same keys again (idempotent).
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import S3Error

from shared.service.settings import Settings

RESULT_KINDS = ("mask", "probability", "overlay")
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class StorageError(RuntimeError):
    """Object storage unreachable or misbehaving (transient: retry)."""


class ChecksumMismatch(StorageError):
    """Downloaded bytes do not match the recorded SHA-256."""


def input_key(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise ValueError(f"bad job id {job_id!r}")
    return f"inputs/{job_id}"


def result_key(job_id: str, kind: str) -> str:
    if not _JOB_ID.match(job_id) or kind not in RESULT_KINDS:
        raise ValueError(f"bad result key parts {job_id!r}/{kind!r}")
    return f"results/{job_id}/{kind}.png"


def result_prefix(job_id: str) -> str:
    return f"results/{job_id}/"


#: A study result's path below its results prefix: a plain name or overlays/<name>; never "..", never absolute.
_STUDY_FILE = re.compile(r"^(?:overlays/)?[A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9]{1,8}){1,2}$")


def _study_id(study_id: str) -> str:
    if not _JOB_ID.match(study_id or ""):
        raise ValueError(f"bad study id {study_id!r}")
    return study_id


def study_prefix(study_id: str) -> str:
    """Every object of one study is below this prefix."""
    return f"studies/{_study_id(study_id)}/"


def study_input_key(study_id: str) -> str:
    """The normalised, de-identified input (a tar of NNNN.dcm files or volume.nii.gz)."""
    return study_prefix(study_id) + "input.tar"


def study_upload_key(study_id: str) -> str:
    """The upload as received; written only when de-identification is off."""
    return study_prefix(study_id) + "upload"


def study_results_prefix(study_id: str) -> str:
    return study_prefix(study_id) + "results/"


def is_study_file(name: str) -> bool:
    """Whether `name` is a well-formed result path (mask.nii.gz, report.json, overlays/0003.png, ...)."""
    return bool(_STUDY_FILE.match(name or ""))


def study_result_key(study_id: str, name: str) -> str:
    if not is_study_file(name):
        raise ValueError(f"bad study result name {name!r}")
    return study_results_prefix(study_id) + name


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Storage:
    settings: Settings
    client: Minio
    public_client: Minio

    @classmethod
    def from_settings(cls, settings: Settings) -> "Storage":
        def make(endpoint: str) -> Minio:
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=min(3.0, settings.s3_timeout), read=settings.s3_timeout),
                maxsize=32, retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                                  status_forcelist=(500, 502, 503, 504)))
            return Minio(endpoint, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key,
                         secure=settings.s3_secure, region=settings.s3_region, http_client=http)
        client = make(settings.s3_endpoint)
        public = make(settings.s3_public_endpoint) if settings.s3_public_endpoint else client
        return cls(settings, client, public)

    @property
    def bucket(self) -> str:
        return self.settings.s3_bucket

    # --- bucket -------------------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"cannot create bucket {self.bucket}: {exc}") from exc

    def ping(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                raise StorageError(f"bucket {self.bucket} does not exist")
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(str(exc)) from exc

    # --- objects ------------------------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, content_type: str, sha256: str | None = None,
                  metadata: dict | None = None) -> str:
        sha = sha256 or sha256_hex(data)
        meta = {"sha256": sha}
        meta.update(metadata or {})
        try:
            self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type,
                                   metadata=meta)
        except (S3Error, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise StorageError(f"put {key}: {exc}") from exc
        return sha

    def get_bytes(self, key: str, expect_sha256: str | None = None) -> bytes:
        try:
            resp = self.client.get_object(self.bucket, key)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"get {key}: {exc}") from exc
        if expect_sha256 and sha256_hex(data) != expect_sha256:
            raise ChecksumMismatch(f"{key}: checksum mismatch")
        return data

    def stream(self, key: str, chunk: int = 64 * 1024):
        """(iterator over the object's bytes, size). Raises KeyError when missing."""
        try:
            resp = self.client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise KeyError(key) from None
            raise StorageError(f"get {key}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"get {key}: {exc}") from exc
        size = int(resp.headers.get("Content-Length", 0))

        def gen():
            try:
                yield from resp.stream(chunk)
            finally:
                resp.close()
                resp.release_conn()
        return gen(), size

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return False
            raise StorageError(str(exc)) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(str(exc)) from exc

    def list_keys(self, prefix: str = "") -> list[str]:
        try:
            return [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(str(exc)) from exc

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        for k in keys:
            try:
                self.client.remove_object(self.bucket, k)
            except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
                raise StorageError(str(exc)) from exc
        return len(keys)

    def presigned_url(self, key: str, ttl_seconds: int | None = None) -> str:
        ttl = ttl_seconds or self.settings.presign_ttl_seconds
        # Signing is local (no request) when the region is given, so this costs no round trip.
        return self.public_client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=ttl))
