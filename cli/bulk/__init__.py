"""`covidseg submit` and `covidseg fetch`: the overnight bulk client for whole studies (REST, issue 5).

What users read is `HELP` below (the --help text of both commands). The package:
* `discovery` - studies on disk: `LocalStudy`, `scan_studies`, `default_name`, `idempotency_key`, `write_study_zip`
  (the deterministic zip of a DICOM folder);
* `records`   - the JSON records rewritten atomically: the manifest of `submit` (`Manifest`) and the download state
  of `fetch` (`FetchState`);
* `client`    - HTTP with retries: `Client`, `RetryPolicy`, `MultipartBody`, `error_message`, the errors `Fatal`,
  `Stopped`, `TransientFailure`;
* `submit`    - `covidseg submit`: `Submitter`, the progress bars, `cmd_submit` and its summary table;
* `fetch`     - `covidseg fetch`: polling, downloads checked against their SHA-256, `cmd_fetch`, OUT/summary.csv;
* `common`    - helpers of both commands: the --server / --token / retry options, a file's SHA-256, the table.
This module adds both commands (`register`, the command-module contract of cli/__init__.py) and re-exports the
names used elsewhere (scripts/bench_studies.py, tests/service/test_bulk_client.py).
"""
from __future__ import annotations

import argparse

from cli import int_at_least

from .discovery import LocalStudy, idempotency_key, scan_studies, write_study_zip
from .fetch import cmd_fetch
from .records import DEFAULT_MANIFEST
from .submit import cmd_submit

__all__ = ["HELP", "LocalStudy", "cmd_fetch", "cmd_submit", "idempotency_key", "register", "scan_studies",
           "write_study_zip"]

#: the --help text of `submit` and `fetch`: the user documentation of the bulk client
HELP = """`covidseg submit` and `covidseg fetch`: the overnight bulk client for whole studies (REST, issue 5).

    covidseg submit DIR --server URL [--token T] [--manifest FILE] [--concurrency N] [--retries N]
    covidseg fetch [--manifest FILE] --out DIR [--wait] [--server URL] [--token T]

`submit` walks DIR for studies:
* a folder that directly holds DICOM files (`*.dcm`, or any file with the `DICM` preamble) is one study; its files
  are zipped on the fly (deterministic bytes: sorted, renamed `NNNN.dcm`, fixed timestamps) and sent as one .zip;
* every `.zip`, `.nii` or `.nii.gz` file is one study, sent as it is.
Hidden files and folders are skipped. What is uploaded never carries local file or folder names (they may name
patients): the server sees `study.zip` / `volume.nii.gz`; the mapping stays in the local manifest.

Every study gets a stable `Idempotency-Key`: a hash of its path relative to DIR and of its content digest. The
manifest (JSON, default `./covidseg-manifest.json`, rewritten atomically after every state change) records each
study's key, state and server id. An interrupted run (Ctrl+C, kill -9, reboot) is resumed by running the same
command again: accepted studies are skipped, and a study whose upload reached the server but not the manifest is
sent again with the same key, which the server answers with the existing study - no duplicates, no gaps. A study
whose content changed gets a new key and is submitted again.

Retries: connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff and jitter
(`--retries`, `--backoff`; a `Retry-After` header is honoured). Other 4xx answers are never retried: the study
is recorded as rejected with the server's message (a study whose content has not changed is not sent again).
401/403 (token) and 404 (no studies API at that URL) stop the run. If the server stays unreachable, the run stops
with a clear error; the manifest keeps what is left for the next run.

Exit codes of `submit`: 0 every study is accepted; 1 some were rejected or could not be submitted (run it again
to resume); 2 bad arguments (missing folder, no token, bad URL, token refused, manifest of another folder).

`fetch` polls every submitted study and downloads `report.json`, `summary.png`, `mask.nii.gz` and
`lung_mask.nii.gz` (and `mask.seg.dcm`, the DICOM SEG, for DICOM studies) of every finished one into
OUT/<study name>/ (plus OUT/summary.csv with the key numbers).
Files already downloaded (SHA-256 recorded in the manifest and matching the file on disk) are skipped; downloads
go to a temporary file first, so a killed fetch never leaves a half file that counts as done. `--wait` keeps
polling until every study is finished. Exit codes: 0 nothing failed, 1 some studies failed or were cancelled or
a download failed, 2 bad arguments.

Environment (client side; not service settings):
* `COVIDSEG_TOKEN`  - bearer token when `--token` is not given (keeps it out of `ps` and shell history).
* `COVIDSEG_SERVER` - server URL when `--server` is not given.
* `COVIDSEG_BULK_PAUSE_AFTER=N` - testing hook: once the server has accepted the N-th upload of this run, the
  client stops right BEFORE recording it in the manifest (the worst moment for a crash) and sleeps until it is
  killed; it prints `paused after N accepted uploads` on stderr. tests/service/test_bulk_client.py uses it to
  kill -9 the client deterministically half-way.
"""


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=DEFAULT_MANIFEST,
                   help=f"local JSON record of the run (default ./{DEFAULT_MANIFEST})")
    p.add_argument("--token", default=None, help="bearer token (default: $COVIDSEG_TOKEN)")
    p.add_argument("--retries", type=int_at_least(0, "an integer >= 0"), default=5,
                   help="retries of a request after connection errors, timeouts, 429 and 5xx (default 5)")
    p.add_argument("--backoff", type=_nonneg_float, default=1.0,
                   help="first retry delay in seconds, doubled each time, with jitter (default 1)")
    p.add_argument("--timeout", type=_nonneg_float, default=300.0,
                   help="seconds to wait for an answer (default 300)")


def register(subparsers) -> None:
    """Add `submit` and `fetch`."""
    s = subparsers.add_parser("submit", help="upload a folder of studies (resumable, idempotent)",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("dir", metavar="DIR", help="folder of studies (DICOM folders, .zip, .nii, .nii.gz)")
    s.add_argument("--server", default=None, help="service URL, e.g. http://host:8000 (default: $COVIDSEG_SERVER)")
    s.add_argument("--concurrency", type=int_at_least(1, "a positive integer"), default=2,
                   help="parallel uploads (default 2)")
    s.add_argument("--resubmit-rejected", action="store_true",
                   help="send studies the server rejected before again (by default only if their files changed)")
    _add_common(s)
    s.set_defaults(func=cmd_submit)

    f = subparsers.add_parser("fetch", help="download the results of submitted studies",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--out", required=True, help="folder for the results (OUT/<study name>/...)")
    f.add_argument("--wait", action="store_true", help="keep polling until every study is finished")
    f.add_argument("--interval", type=_nonneg_float, default=10.0, help="seconds between polls with --wait")
    f.add_argument("--server", default=None, help="service URL (default: the one in the manifest)")
    _add_common(f)
    f.set_defaults(func=cmd_fetch)
