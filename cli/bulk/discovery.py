"""Studies on disk for `covidseg submit` (cli.bulk): what counts as a study, its key, the bytes sent.

* a folder that directly holds DICOM files (`*.dcm`, or any file with the `DICM` preamble) is one study; its files
  are zipped on the fly (`write_study_zip`; deterministic bytes: sorted, renamed `NNNN.dcm`, fixed timestamps) and
  sent as one .zip;
* every `.zip`, `.nii` or `.nii.gz` file is one study, sent as it is.
Hidden files and folders are skipped (`scan_studies`). What is uploaded never carries local file or folder names
(they may name patients): the server sees `study.zip` / `volume.nii.gz` (`LocalStudy.upload_name`); the output
name (`default_name`) stays in the local manifest.

Every study gets a stable `Idempotency-Key` (`idempotency_key`): a hash of its path relative to DIR and of its
content digest. A study resent after a crash is the same request; a study whose content changed gets a new key.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .common import _sha256_file


@dataclass
class LocalStudy:
    """One study found under the submitted folder."""

    rel: str                 # path relative to the root, posix ("." = the root folder itself)
    kind: str                # "dicom" (a folder of DICOM files), "zip" or "nifti"
    files: list[Path]        # the DICOM files (sorted) or the one file
    name: str = ""           # output folder name (unique; assigned once and kept in the manifest)

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def stamp(self) -> str:
        """Cheap change detector (names, sizes, mtimes): the content digest is reused while it matches."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def digest(self) -> str:
        """SHA-256 of the content (for a folder: of each file's name and SHA-256, in order)."""
        if self.kind != "dicom":
            return _sha256_file(self.files[0])
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{_sha256_file(f)}\n".encode())
        return h.hexdigest()

    def upload_name(self) -> tuple[str, str]:
        """(file name sent to the server, content type): never a local name."""
        if self.kind == "dicom" or self.kind == "zip":
            return "study.zip", "application/zip"
        if self.files[0].name.lower().endswith(".nii.gz"):
            return "volume.nii.gz", "application/gzip"
        return "volume.nii", "application/octet-stream"


def idempotency_key(rel: str, digest: str) -> str:
    """Stable per study and content: the same study resent (after a crash) gets the same key."""
    return "covidseg-bulk-" + hashlib.sha256(f"{rel}\n{digest}".encode()).hexdigest()[:48]


def _is_dicom(path: Path) -> bool:
    name = path.name.lower()
    if name == "dicomdir":          # a media index, not an image
        return False
    if name.endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _study_file_kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        return "nifti"
    return None


def _strip_suffix(rel: str) -> str:
    low = rel.lower()
    for suf in (".nii.gz", ".nii", ".zip"):
        if low.endswith(suf):
            return rel[: -len(suf)]
    return rel


def scan_studies(root: Path, skip: tuple[Path, ...] = ()) -> tuple[list[LocalStudy], int]:
    """All studies under `root` (sorted by relative path) and the number of other files ignored."""
    root = root.resolve()
    skip_set = {p.resolve() for p in skip}
    studies: list[LocalStudy] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        dicoms = []
        for fn in sorted(filenames):
            p = here / fn
            if fn.startswith(".") or p.resolve() in skip_set or not p.is_file():
                continue
            kind = _study_file_kind(fn)
            if kind:
                studies.append(LocalStudy(rel=p.relative_to(root).as_posix(), kind=kind, files=[p]))
            elif _is_dicom(p):
                dicoms.append(p)
            elif not fn.endswith((".json", ".lock", ".tmp")):
                ignored += 1
        if dicoms:
            studies.append(LocalStudy(rel=rel_dir, kind="dicom", files=dicoms))
    studies.sort(key=lambda s: s.rel)
    return studies, ignored


def default_name(study: LocalStudy, root: Path) -> str:
    """Output folder name: the relative path without .zip/.nii/.nii.gz (the root itself: its own name)."""
    if study.rel == ".":
        return root.resolve().name or "study"
    return _strip_suffix(study.rel) if study.kind != "dicom" else study.rel


def write_study_zip(study: LocalStudy, out) -> None:
    """Zip a DICOM folder into the file object `out`, byte-identical on every run (the server fingerprints the
    upload: a resent study must be the same request)."""
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i, f in enumerate(study.files):
            info = zipfile.ZipInfo(f"{i:04d}.dcm", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, f.read_bytes(), compresslevel=1)
