"""Safe unpacking of a study upload into a normalised, de-identified study folder (`unpack_study_upload`).

- Uploads: one .zip of a DICOM series, several DICOM files, or one .nii/.nii.gz. Formats are recognised from the
  content, never from the client's file name, and client names are never used as paths (nor quoted in errors:
  they may hold patient names; files are named by their position, e.g. "upload file 3", "zip member 17").
- A normalised folder holds either `NNNN.dcm` (ONE series, sorted by position, de-identified) or `volume.nii.gz`.
- Everything wrong with an upload raises `StudyError` (a ValueError) whose message is fit for a 4xx JSON `error`
  or `error: ...` on the command line; it never contains patient data.
"""
from __future__ import annotations

import gzip
import io
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.core import imageio
from shared.core.imageio import ImageDecodeError
from shared.core.study.deidentify import _series_key_hash, deidentify_dataset
from shared.core.study.errors import (
    DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, DEFAULT_SALT, MAX_SLICE_SIDE, NIFTI_NAME, SPACING_TOLERANCE, StudyError,
)

# zip members that are never part of a series (skipped silently)
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass
class _Blob:
    label: str          # "upload file 3" / "zip member 17 of upload file 1": never the client's name
    path: Path          # staging file (generated name)
    size: int


def _classify(data: bytes) -> str:
    """"zip" | "nifti" | "dicom" | "gzip" | "png" | "jpeg" | "tiff" | "empty" | "unknown", from the content."""
    if not data:
        return "empty"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(data)).read(540)
        except (OSError, EOFError, zipfile.BadZipFile):
            return "gzip"
        return "nifti" if _nifti_header(head) else "gzip"
    if _nifti_header(data[:540]):
        return "nifti"
    fmt = imageio.sniff_format(data)
    return fmt or "unknown"


def _nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return len(head) >= 8 and head[4:8] in (b"n+2\x00",) and struct.unpack("<i", head[:4])[0] in (540,)


def _fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts
            or "\x00" in name)


def _junk_member(name: str) -> bool:
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if not parts:
        return True
    base = parts[-1]
    return parts[0] == "__MACOSX" or base.startswith(".") or base.lower() in _JUNK_NAMES


class _Budget:
    """Counts files and bytes across the whole upload (zips included) against the caps."""

    def __init__(self, max_files: int, max_bytes: int):
        self.max_files, self.max_bytes = int(max_files), int(max_bytes)
        self.files = 0
        self.bytes = 0
        self._names = 0

    def staging_path(self, staging: Path) -> Path:
        self._names += 1
        return staging / f"{self._names:06d}"

    def add_file(self, what: str) -> None:
        self.files += 1
        if self.files > self.max_files:
            raise StudyError(f"too many files: more than {self.max_files:,} ({what}); "
                             "send one series per study")

    def add_bytes(self, n: int, what: str) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise StudyError(f"upload too large: more than {_fmt_bytes(self.max_bytes)} once unpacked ({what}; "
                             "a zip bomb or more than one study?)")


def _extract_zip(data: bytes, label: str, staging: Path, budget: _Budget) -> tuple[list[_Blob], int]:
    """Zip members -> staging files under generated names. Returns (members, junk members skipped)."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise StudyError(f"{label}: broken zip archive ({exc})") from None
    members = [i for i in infos if not i.is_dir()]
    for n, info in enumerate(members, 1):  # check every header before reading anything
        if _unsafe_member(info.filename):
            raise StudyError(f"{label}: zip member {n} has an unsafe path (absolute or with '..'); "
                             "archive refused")
        if info.flag_bits & 0x1:
            raise StudyError(f"{label}: zip member {n} is encrypted; send an unencrypted zip")
    files = [(n, i) for n, i in enumerate(members, 1) if not _junk_member(i.filename)]
    if len(files) + budget.files > budget.max_files:
        raise StudyError(f"too many files: {label} holds {len(files):,} files (limit {budget.max_files:,} per "
                         "study); send one series per study")
    declared = sum(i.file_size for _, i in files)
    if budget.bytes + declared > budget.max_bytes:
        raise StudyError(f"upload too large: {label} unpacks to {_fmt_bytes(declared)} (limit "
                         f"{_fmt_bytes(budget.max_bytes)}; a zip bomb or more than one study?)")
    out = []
    for n, info in files:
        what = f"zip member {n} of {label}"
        budget.add_file(what)
        path = budget.staging_path(staging)
        size = 0
        try:
            with zf.open(info) as src, open(path, "wb") as dst:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    # declared sizes can lie: count what really comes out
                    if size > info.file_size:
                        raise StudyError(f"{what}: unpacks to more than its declared size (zip bomb?)")
                    budget.add_bytes(len(chunk), what)
                    dst.write(chunk)
        except StudyError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
            raise StudyError(f"{what}: broken zip member ({exc})") from None
        out.append(_Blob(what, path, size))
    return out, len(members) - len(files)


def unpack_study_upload(files: list[tuple[str, bytes]], dest: Path, *, series_uid: str | None = None,
                        deidentify: bool = True, max_files: int = DEFAULT_MAX_FILES,
                        max_bytes: int = DEFAULT_MAX_BYTES, salt: str | bytes | None = None) -> dict:
    """Turn an upload into a normalised study folder `dest`; return non-identifying metadata.

    `files`: (client name, content) pairs: one .zip of a DICOM series, several DICOM files (zips may be mixed
    in), or one .nii/.nii.gz alone. Names are ignored (formats come from the content).

    DICOM: the images are grouped by SeriesInstanceUID. `series_uid` picks one; otherwise the largest series is
    taken (localizers and other small series next to it are left out), and when two or more series tie for the
    most slices the upload is refused with a list of them, so the client can resend with `series_uid`.
    The chosen series must be CT, single-frame, one size, one orientation, axial, with a position per slice,
    no two slices at one position and regular spacing. It is written as `dest/NNNN.dcm` sorted by position,
    de-identified unless `deidentify=False` (see `deidentify_dataset`). NIfTI: `dest/volume.nii.gz` (header
    text fields and extensions cleared when de-identifying).

    Safety: zip members with absolute or `..` paths refuse the archive; members are written under generated
    names; `max_files` caps files (DICOM files + zip members), `max_bytes` caps bytes (the upload and what zips
    unpack to, counted as it is read, so lying headers do not help). `salt` keys the series-UID hash and the
    re-mapped UIDs (pass a secret; the default is a fixed project salt).

    Returns {"format", "modality", "n_slices", "shape" [z, y, x], "spacing" [z, y, x] mm, "orientation"
    (axis codes of columns, rows, slices), "series_count", "series_uid_hash", "n_files", "skipped_files",
    "deidentified", "is_hu"}. Raises StudyError naming the problem.
    """
    dest = Path(dest)
    salt = DEFAULT_SALT if salt is None else salt
    if not files:
        raise StudyError("no file uploaded: send a .zip of a DICOM series, DICOM files or one .nii/.nii.gz")
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / ".incoming"
    if staging.exists():  # left over by a killed process
        shutil.rmtree(staging)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty: a study folder holds exactly one unpacked upload")
    staging.mkdir()
    written: list[Path] = []
    try:
        budget = _Budget(max_files, max_bytes)
        blobs: list[_Blob] = []
        nifti: list[_Blob] = []
        skipped = 0
        n_upload = len(files)
        for n, (_name, data) in enumerate(files, 1):
            label = f"upload file {n}" if n_upload > 1 else "the uploaded file"
            data = bytes(data)
            budget.add_bytes(len(data), label)
            kind = _classify(data)
            if kind == "zip":
                members, junk = _extract_zip(data, label, staging, budget)
                skipped += junk
                for m in members:
                    with open(m.path, "rb") as f:
                        mkind = _classify(f.read(1 << 16))
                    if mkind in ("dicom", "nifti"):
                        (nifti if mkind == "nifti" else blobs).append(m)
                    else:  # README, viewer software, pictures next to the series in exports
                        skipped += 1
                        m.path.unlink()
                continue
            budget.add_file(label)
            if kind == "empty":
                raise StudyError(f"{label} is empty")
            if kind not in ("dicom", "nifti"):
                raise StudyError(f"{label} is {_kind_text(kind, data)}: expected a DICOM file, a zip of a DICOM "
                                 "series or a NIfTI volume (.nii/.nii.gz)")
            path = budget.staging_path(staging)
            path.write_bytes(data)
            (nifti if kind == "nifti" else blobs).append(_Blob(label, path, len(data)))
        if not blobs and not nifti:
            raise StudyError("no DICOM files or NIfTI volume in the upload")
        if nifti:
            if len(nifti) > 1 or blobs:
                raise StudyError("a NIfTI volume must be uploaded alone (one .nii/.nii.gz per study, no DICOM "
                                 "files or other volumes with it)")
            written.append(dest / NIFTI_NAME)
            meta = _unpack_nifti(nifti[0], dest, deidentify, max_bytes, max_files)
            meta.update({"n_files": 1, "skipped_files": skipped, "series_count": 1, "series_uid_hash": None})
            return meta
        meta = _unpack_dicom(blobs, dest, series_uid, deidentify, salt, written)
        meta["skipped_files"] += skipped
        return meta
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _kind_text(kind: str, data: bytes) -> str:
    if kind in ("png", "jpeg", "tiff"):
        return f"a {kind.upper()} image (single slices go to the jobs API or `covidseg predict`)"
    if kind == "gzip":
        return "a gzip file that is not a NIfTI volume"
    try:
        text = data[:256].decode("utf-8")
        if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
            return "a text file"
    except UnicodeDecodeError:
        pass
    return "of an unrecognised format"


# ---- NIfTI ---------------------------------------------------------------------------------------------------
def _unpack_nifti(blob: _Blob, dest: Path, deidentify: bool, max_bytes: int, max_slices: int) -> dict:
    import nibabel as nib

    with open(blob.path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    src = blob.path.with_name(blob.path.name + (".nii.gz" if gz else ".nii"))
    blob.path.rename(src)
    try:
        img = nib.load(str(src))
        shape = tuple(int(s) for s in img.shape)
        dtype = img.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        raise StudyError(f"{blob.label}: damaged NIfTI header ({exc})") from None
    shape3 = shape[:3] if len(shape) > 3 and all(s == 1 for s in shape[3:]) else shape
    if len(shape3) != 3 or min(shape3) < 1:
        raise StudyError(f"{blob.label}: expected a 3-D NIfTI volume, got shape {shape}")
    nbytes = int(np.prod(shape3)) * max(int(dtype.itemsize), 1)
    if nbytes > max_bytes:
        raise StudyError(f"{blob.label}: the volume holds {_fmt_bytes(nbytes)} of voxels (limit "
                         f"{_fmt_bytes(max_bytes)})")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError(f"{blob.label}: the NIfTI affine is degenerate (no usable voxel geometry)")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated gzip stream, short file ...
        raise StudyError(f"{blob.label}: truncated or damaged NIfTI voxel data ({exc})") from None
    data = data.reshape(shape3)
    if data.dtype.kind not in "biuf":
        raise StudyError(f"{blob.label}: unsupported NIfTI voxel type {data.dtype} (expected a grayscale CT)")
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise StudyError(f"{blob.label}: the volume has NaN or infinite voxels")
    # geometry of the display grid the study will be read on (shared.core.imageio.read_nifti)
    src_ornt = nib.orientations.io_orientation(affine)
    to_disp = nib.orientations.ornt_transform(src_ornt, nib.orientations.axcodes2ornt(imageio.DISPLAY_AXCODES))
    disp_affine = affine @ nib.orientations.inv_ornt_aff(to_disp, shape3)
    disp_shape = [0, 0, 0]
    for axis, (target, _flip) in enumerate(to_disp):
        disp_shape[int(target)] = shape3[axis]
    spacing = np.sqrt((disp_affine[:3, :3] ** 2).sum(axis=0))  # (col, row, slice)
    if disp_shape[2] > max_slices:
        raise StudyError(f"{blob.label}: {disp_shape[2]:,} slices (limit {max_slices:,})")
    if min(disp_shape[:2]) < 16 or max(disp_shape[:2]) > MAX_SLICE_SIDE:
        raise StudyError(f"{blob.label}: axial slices of {disp_shape[0]}x{disp_shape[1]} voxels are out of range "
                         f"(16 to {MAX_SLICE_SIDE} a side)")
    header = img.header.copy()
    if deidentify:  # free-text fields and extensions (which can carry whole DICOM headers)
        for key in ("descrip", "aux_file", "intent_name", "db_name"):
            if key in header:
                header[key] = b""
        header.extensions.clear()
    out = type(img)(data, affine, header)
    nib.save(out, str(dest / NIFTI_NAME))
    is_hu = bool(float(data.min()) <= -500 and float(data.max()) >= 0)
    return {"format": "nifti", "modality": "CT" if is_hu else "unknown", "n_slices": int(disp_shape[2]),
            "shape": [int(disp_shape[2]), int(disp_shape[1]), int(disp_shape[0])],
            "spacing": [float(v) for v in spacing[::-1]], "orientation": "".join(nib.aff2axcodes(disp_affine)),
            "deidentified": bool(deidentify), "is_hu": is_hu}


# ---- DICOM ---------------------------------------------------------------------------------------------------
def _read_header(blob: _Blob):
    try:
        return imageio._dcmread(str(blob.path), stop_before_pixels=True)
    except ImageDecodeError as exc:
        raise StudyError(f"{blob.label}: {exc}") from None


def _floats(ds, keyword: str, n: int) -> np.ndarray | None:
    v = ds.get(keyword)
    if v is None:
        return None
    try:
        arr = np.array([float(x) for x in (list(v) if n > 1 else [v])], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _unpack_dicom(blobs: list[_Blob], dest: Path, series_uid, deidentify: bool, salt, written: list[Path]) -> dict:
    images, skipped = [], 0
    for b in blobs:
        ds = _read_header(b)
        if "Rows" not in ds or "Columns" not in ds:
            skipped += 1   # DICOMDIR, structured reports, presentation states next to the images
            continue
        images.append((b, ds))
    if not images:
        raise StudyError("no DICOM images in the upload (only files without pixel data such as DICOMDIR or "
                         "reports)")
    by_series: dict[str, list] = {}
    for b, ds in images:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append((b, ds))
    chosen_uid = _choose_series(by_series, series_uid)
    chosen = by_series[chosen_uid]
    ordered, geo = _check_series(chosen)
    for k, (b, ds_head) in enumerate(ordered):
        ds = _read_full(b)
        if deidentify:
            deidentify_dataset(ds, salt)
        out = dest / f"{k:04d}.dcm"
        buf = io.BytesIO()  # always re-written: raw datasets get a file meta header, files a standard layout
        ds.save_as(buf, enforce_file_format=True)
        out.write_bytes(buf.getvalue())
        written.append(out)
    ref = ordered[0][1]
    return {"format": "dicom", "modality": str(ref.get("Modality", "") or "CT").upper(),
            "n_slices": len(ordered), "shape": [len(ordered), geo["rows"], geo["cols"]],
            "spacing": [geo["dz"], geo["dy"], geo["dx"]], "orientation": geo["orientation"],
            "series_count": len(by_series), "series_uid_hash": _series_key_hash(chosen_uid, salt),
            "n_files": len(blobs), "skipped_files": skipped + sum(len(v) for u, v in by_series.items()
                                                                  if u != chosen_uid),
            "deidentified": bool(deidentify), "is_hu": True}


def _describe_series(uid: str, items: list) -> str:
    ds = items[0][1]
    number = ds.get("SeriesNumber", "")
    modality = ds.get("Modality", "") or "?"
    return f"{uid or '(no SeriesInstanceUID)'} (series number {number or '?'}, {modality}, {len(items)} images)"


def _choose_series(by_series: dict[str, list], series_uid: str | None) -> str:
    if series_uid is not None:
        series_uid = str(series_uid).strip()
        if series_uid not in by_series:
            listed = "; ".join(_describe_series(u, v) for u, v in by_series.items())
            raise StudyError(f"series_uid {series_uid} is not in the upload; it holds: {listed}")
        return series_uid
    if len(by_series) == 1:
        return next(iter(by_series))
    ranked = sorted(by_series.items(), key=lambda kv: -len(kv[1]))
    if len(ranked[0][1]) == len(ranked[1][1]):
        tied = [kv for kv in ranked if len(kv[1]) == len(ranked[0][1])]
        listed = "; ".join(_describe_series(u, v) for u, v in tied)
        raise StudyError(f"the upload mixes {len(by_series)} DICOM series and {len(tied)} of them are equally "
                         f"large: {listed}. Send one series, or choose one with series_uid")
    return ranked[0][0]


def _check_series(items: list) -> tuple[list, dict]:
    """Validate one series' headers; return the items sorted by position and the geometry."""
    import nibabel as nib

    ref = items[0][1]
    modality = str(ref.get("Modality", "") or "").upper()
    if modality and modality != "CT":
        raise StudyError(f"the series is {modality}, not CT: this service segments CT studies")
    if not modality and "RescaleIntercept" not in ref:
        raise StudyError("the series has no Modality and no RescaleIntercept: not a CT series")
    sizes: dict[tuple[int, int], int] = {}
    for b, ds in items:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise StudyError(f"{b.label} is a multi-frame DICOM ({frames} frames); send the series as "
                             "single-slice files")
        sizes[(int(ds.Rows), int(ds.Columns))] = sizes.get((int(ds.Rows), int(ds.Columns)), 0) + 1
    if len(sizes) > 1:
        listed = ", ".join(f"{c}x{r} ({n} files)" for (r, c), n in sorted(sizes.items(), key=lambda t: -t[1]))
        raise StudyError(f"slices of different sizes in one series: {listed}")
    rows, cols = next(iter(sizes))
    if min(rows, cols) < 16 or max(rows, cols) > MAX_SLICE_SIDE:
        raise StudyError(f"slice size {cols}x{rows} is out of range (16 to {MAX_SLICE_SIDE} pixels a side)")
    iop = _floats(ref, "ImageOrientationPatient", 6)
    ps = _floats(ref, "PixelSpacing", 2)
    missing_pos = [b.label for b, ds in items if _floats(ds, "ImagePositionPatient", 3) is None]
    if len(items) > 1 and (iop is None or missing_pos):
        what = "ImageOrientationPatient" if iop is None else \
            f"ImagePositionPatient in {len(missing_pos)} of {len(items)} files (e.g. {missing_pos[0]})"
        raise StudyError(f"slice positions are missing: no {what}; the slices cannot be ordered")
    if iop is None:
        iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    if ps is None or np.any(ps <= 0):
        raise StudyError("the series has no valid PixelSpacing: volumes in mL cannot be measured")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-2:
        raise StudyError("ImageOrientationPatient is not two orthogonal unit vectors")
    if abs(normal[2]) < 0.8:
        raise StudyError("the series is not axial (slices are sagittal, coronal or strongly tilted); "
                         "send the axial series")
    for b, ds in items:
        other = _floats(ds, "ImageOrientationPatient", 6)
        if other is not None and np.abs(other - iop).max() > 1e-3:
            raise StudyError(f"slices with different orientations in one series ({b.label})")
        other_ps = _floats(ds, "PixelSpacing", 2)
        if other_ps is not None and np.abs(other_ps - ps).max() > 1e-3:
            raise StudyError(f"slices with different pixel spacings in one series ({b.label})")
    if len(items) == 1:
        ordered = list(items)
        dz = float(ref.get("SliceThickness", 1) or 1)
    else:
        keyed = sorted(((float(np.dot(_floats(ds, "ImagePositionPatient", 3), normal)), b.label, (b, ds))
                        for b, ds in items), key=lambda t: t[0])
        d = np.array([t[0] for t in keyed])
        steps = np.diff(d)
        dup = np.nonzero(steps < 1e-3)[0]
        if dup.size:
            i = int(dup[0])
            raise StudyError(f"two slices at the same position ({keyed[i][1]} and {keyed[i + 1][1]}, "
                             f"{d[i]:.2f} mm): duplicate files or several acquisitions in one series")
        dz = float(np.median(steps))
        bad = np.nonzero(np.abs(steps - dz) > max(SPACING_TOLERANCE * dz, 0.05))[0]
        if bad.size:
            i = int(bad[0])
            raise StudyError(f"irregular slice spacing: a gap of {steps[i]:.2f} mm between slices {i} and "
                             f"{i + 1} where the series steps {dz:.2f} mm (missing slices?)")
        ordered = [t[2] for t in keyed]
    lps_dirs = np.stack([row_dir, col_dir, normal], axis=1)
    ras = np.diag([-1.0, -1.0, 1.0]) @ lps_dirs
    aff = np.eye(4)
    aff[:3, :3] = ras
    orientation = "".join(nib.aff2axcodes(aff))
    return ordered, {"rows": rows, "cols": cols, "dx": float(ps[1]), "dy": float(ps[0]), "dz": dz,
                     "orientation": orientation}


def _ensure_file_meta(ds) -> None:
    """Raw datasets (no preamble, no file meta) get the transfer syntax they were read with, so their pixels
    decode and they can be written as files."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (False, True))
    meta = meta if meta is not None else FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta


def _read_full(blob: _Blob):
    """The whole dataset, its pixels decoded once: missing, damaged or undecodable pixel data fails the upload
    (a 4xx now) instead of the worker later."""
    try:
        ds = imageio._dcmread(str(blob.path))
        _ensure_file_meta(ds)
        arr = imageio._dicom_pixels(ds)
        if arr.shape != (int(ds.Rows), int(ds.Columns)):
            raise StudyError(f"{blob.label}: pixel data of shape {arr.shape} does not match its "
                             f"{ds.Columns}x{ds.Rows} header")
    except ImageDecodeError as exc:
        raise StudyError(f"{blob.label}: {exc}") from None
    return ds
