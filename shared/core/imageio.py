"""Reading CT slices and volumes: PNG/JPEG/TIFF/BMP files and bytes, DICOM (single file or series folder), NIfTI.

- 2-D images come back as 2-D grayscale arrays (uint8 for 8-bit files, uint16 for 16-bit PNG/TIFF, the
  lung-windowed uint8 for DICOM CT). `shared.core.preprocessing.preprocess` accepts all of them.
- Volumes come back as a `Volume`: a stack of axial slices in display orientation (rows = anterior -> posterior,
  columns = patient right -> left, like a radiology viewer and like DICOM's usual axial pixel order) plus the
  geometry needed to write a mask back over the *original* voxel grid (`Volume.mask_to_nifti`).
- Uploads are checked from their content (`sniff_format`), never from the file name, and their pixel count is
  read from the header (`image_dimensions`) before anything is decoded (decompression bombs).

Everything that is wrong with an input raises `ImageDecodeError` (a ValueError) with a message meant for users.
This module never imports TensorFlow.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

#: Default lung window (Hounsfield units).
LUNG_WINDOW = (-600.0, 1500.0)
#: Default upper bound on decoded pixels (width * height) of one uploaded image: 50 megapixels.
DEFAULT_MAX_PIXELS = 50_000_000
#: File name endings read as 2-D images / as NIfTI volumes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """An input that cannot be read as an image/volume; `str(exc)` is a message for users."""


# --------------------------------------------------------------------------------------------------------------
# format sniffing and header-only dimensions
# --------------------------------------------------------------------------------------------------------------
def sniff_format(data: bytes) -> str | None:
    """"png" | "jpeg" | "tiff" | "dicom" | None, from the first bytes of the content (never the file name)."""
    head = bytes(data[:132])
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _looks_like_raw_dicom(head):
        return "dicom"
    return None


def _looks_like_raw_dicom(head: bytes) -> bool:
    """DICOM without the 128-byte preamble: starts with an explicit-VR group 0x0002/0x0008 element."""
    if len(head) < 8:
        return False
    group, _elem = struct.unpack("<HH", head[:4])
    return group in (0x0002, 0x0008) and head[4:6].isalpha() and head[4:6].isupper()


def sniff_file(path) -> str | None:
    """Like `sniff_format` for a file on disk, plus "nifti" (by content: the n+1 magic, or gzip + .nii.gz)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(352)
    fmt = sniff_format(head)
    if fmt:
        return fmt
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 4 and head[4:8] == b"n+2\x00":
        return "nifti"
    if head[:2] == b"\x1f\x8b" and path.name.lower().endswith(".nii.gz"):
        return "nifti"
    return None


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header only (PNG, JPEG, TIFF, DICOM); no pixel is decoded.

    Raises ImageDecodeError when the format is unknown or the header is damaged.
    """
    fmt = sniff_format(data)
    if fmt == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageDecodeError("damaged PNG: no IHDR header")
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if fmt == "jpeg":
        return _jpeg_dimensions(data)
    if fmt == "tiff":
        return _tiff_dimensions(data)
    if fmt == "dicom":
        ds = _read_dicom_header(data)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        if not rows or not cols:
            raise ImageDecodeError("DICOM file without image (no Rows/Columns)")
        return int(cols), int(rows)
    raise ImageDecodeError(_unknown_format_message(data))


def _unknown_format_message(data: bytes) -> str:
    if len(data) == 0:
        return "empty file"
    try:
        text = bytes(data[:256]).decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "not an image: looks like a text file (expected PNG, JPEG, TIFF or DICOM)"
    return "unsupported or unrecognised image format (expected PNG, JPEG, TIFF or DICOM)"


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageDecodeError("damaged JPEG: bad marker structure")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            if w == 0 or h == 0:
                raise ImageDecodeError("damaged JPEG: zero image size")
            return int(w), int(h)
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        i += 2 + seg_len
    raise ImageDecodeError("damaged or truncated JPEG: no frame header")


def _tiff_dimensions(data: bytes) -> tuple[int, int]:
    bo = "<" if data[:2] == b"II" else ">"
    try:
        magic = struct.unpack(bo + "H", data[2:4])[0]
        if magic == 43:  # BigTIFF
            (ifd,) = struct.unpack(bo + "Q", data[8:16])
            (count,) = struct.unpack(bo + "Q", data[ifd:ifd + 8])
            entry0, esize, base = ifd + 8, 20, 4
        else:
            (ifd,) = struct.unpack(bo + "I", data[4:8])
            (count,) = struct.unpack(bo + "H", data[ifd:ifd + 2])
            entry0, esize, base = ifd + 2, 12, 4
        width = height = None
        for k in range(min(count, 4096)):
            e = entry0 + k * esize
            tag, typ = struct.unpack(bo + "HH", data[e:e + 4])
            if tag not in (256, 257):
                continue
            off = e + base + (8 if magic == 43 else 4)
            if typ == 3:
                (v,) = struct.unpack(bo + "H", data[off:off + 2])
            elif typ == 4:
                (v,) = struct.unpack(bo + "I", data[off:off + 4])
            elif typ == 16:
                (v,) = struct.unpack(bo + "Q", data[off:off + 8])
            else:
                continue
            if tag == 256:
                width = v
            else:
                height = v
        if width and height:
            return int(width), int(height)
    except struct.error:
        pass
    raise ImageDecodeError("damaged or truncated TIFF: no image size in the first directory")


# --------------------------------------------------------------------------------------------------------------
# HU windowing
# --------------------------------------------------------------------------------------------------------------
def window_to_uint8(hu, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """Hounsfield units -> uint8 through the window [level - width/2, level + width/2] (linear, clipped)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = level - width / 2.0
    f = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(np.nan_to_num(f, nan=0.0) + 0.5, 0, 255).astype(np.uint8)


def parse_window(text: str | None) -> tuple[float, float] | None:
    """"LEVEL,WIDTH" (e.g. "-600,1500"), "lung" -> default, "none"/"minmax" -> None (per-slice min-max)."""
    if text is None or text.lower() == "lung":
        return LUNG_WINDOW
    if text.lower() in ("none", "minmax", "off"):
        return None
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ImageDecodeError(f"bad window {text!r}: expected LEVEL,WIDTH such as -600,1500, 'lung' or 'none'") \
            from None
    if width <= 0:
        raise ImageDecodeError(f"bad window {text!r}: width must be > 0")
    return level, width


# --------------------------------------------------------------------------------------------------------------
# 2-D decoding
# --------------------------------------------------------------------------------------------------------------
def decode_image_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       window: tuple[float, float] | None = LUNG_WINDOW) -> np.ndarray:
    """PNG/JPEG/TIFF/DICOM bytes -> 2-D grayscale array (uint8 for 8-bit images; DICOM CT -> lung-windowed uint8).

    The size is checked from the header against `max_pixels` before decoding. Colour images are converted to
    gray (OpenCV weights), alpha is dropped, 16-bit images stay uint16.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) == 0:
        raise ImageDecodeError("empty file")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageDecodeError(_unknown_format_message(data))
    w, h = image_dimensions(data)
    if max_pixels and w * h > max_pixels:
        raise ImageDecodeError(f"image too large: {w}x{h} = {w * h:,} pixels (limit {max_pixels:,})")
    if fmt == "dicom":
        return _decode_dicom_2d(data, window)
    if fmt == "png":
        _check_png_complete(data)
    elif fmt == "jpeg":
        _check_jpeg_complete(data)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageDecodeError(f"damaged {fmt.upper()} file: cannot be decoded")
    return _to_gray(img, fmt)


def _to_gray(img: np.ndarray, fmt: str) -> np.ndarray:
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] in (3, 4):
            code = cv2.COLOR_BGR2GRAY if img.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
            if img.dtype in (np.uint8, np.uint16, np.float32):
                img = cv2.cvtColor(img, code)
            else:
                img = img[:, :, :3].astype(np.float32).mean(axis=2)
        else:
            raise ImageDecodeError(f"unsupported {fmt.upper()} with {img.shape[2]} channels")
    if img.ndim != 2 or img.size == 0:
        raise ImageDecodeError(f"unsupported {fmt.upper()} layout {img.shape}")
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    return img


def _check_png_complete(data: bytes) -> None:
    """Walk the PNG chunks: the file must end with an IEND chunk (OpenCV decodes truncated files silently)."""
    i, n, seen_idat = 8, len(data), False
    while i + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[i:i + 8])
        if ctype == b"IEND":
            if not seen_idat:
                raise ImageDecodeError("damaged PNG: no image data")
            return
        if ctype == b"IDAT":
            seen_idat = True
        i += 12 + length
    raise ImageDecodeError("truncated PNG: the file ends before the image is complete")


def _check_jpeg_complete(data: bytes) -> None:
    tail = data[-64:].rstrip(b"\x00")
    if b"\xff\xd9" not in tail[-4:]:
        raise ImageDecodeError("truncated JPEG: the file ends before the image is complete")


def read_image(path, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               window: tuple[float, float] | None = LUNG_WINDOW) -> np.ndarray:
    """One 2-D image file (PNG/JPEG/TIFF/BMP/DICOM) -> 2-D grayscale array. ImageDecodeError on any problem."""
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(f"{path}: no such file")
    if path.is_dir():
        raise ImageDecodeError(f"{path}: is a folder, not an image file")
    data = path.read_bytes()
    if data[:2] == b"BM" and len(data) > 26:  # BMP (not an upload format, but fine for local files)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise ImageDecodeError(f"{path}: damaged BMP file")
        return _to_gray(img, "bmp")
    try:
        return decode_image_bytes(data, max_pixels=max_pixels, window=window)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------
def _dcmread(src, stop_before_pixels=False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(src, stop_before_pixels=stop_before_pixels, force=True)
    except (InvalidDicomError, EOFError, OSError, struct.error, ValueError, KeyError, TypeError) as exc:
        raise ImageDecodeError(f"damaged DICOM file ({exc})") from None


def _read_dicom_header(data: bytes):
    return _dcmread(io.BytesIO(data), stop_before_pixels=True)


def _dicom_pixels(ds) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except AttributeError:
        raise ImageDecodeError("DICOM file without pixel data") from None
    except (NotImplementedError, RuntimeError) as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise ImageDecodeError(f"cannot decode DICOM pixel data (transfer syntax {ts}): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged pixel data
        raise ImageDecodeError(f"damaged DICOM pixel data ({exc})") from None
    return arr


def _dicom_is_ct_like(ds) -> bool:
    return "RescaleIntercept" in ds or str(ds.get("Modality", "")).upper() == "CT"


def dicom_to_hu(ds, pixels: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> float32 Hounsfield units with RescaleSlope/RescaleIntercept (defaults 1 and 0)."""
    arr = _dicom_pixels(ds) if pixels is None else pixels
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _decode_dicom_2d(data: bytes, window) -> np.ndarray:
    ds = _dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(f"multi-frame DICOM ({frames} frames): give it as a volume, not a single slice")
    arr = _dicom_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB / YBR already converted to RGB by pydicom)
        return cv2.cvtColor(np.ascontiguousarray(arr[..., :3]).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    if _dicom_is_ct_like(ds) and window is not None:
        return window_to_uint8(dicom_to_hu(ds, arr), *window)
    from shared.core.preprocessing import minmax_uint8

    out = arr if arr.dtype == np.uint8 else minmax_uint8(arr)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


# --------------------------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------------------------
#: Display grid axis codes for (column i, row j, slice k): columns go to the patient's Left, rows go Posterior,
#: slices go Superior (nibabel's RAS+ letters name where each axis points).
DISPLAY_AXCODES = ("L", "P", "S")


@dataclass
class Volume:
    """A CT volume as a stack of 2-D slices in display orientation, plus its geometry.

    - `slices`: float32 (n_slices, rows, cols); Hounsfield units when `is_hu`, else the raw stored values.
    - `affine`: 4x4 voxel (col i, row j, slice k) -> world (RAS+, mm) of the display grid (NIfTI convention).
    - `spacing`: (col, row, slice) voxel size in mm; `orientation`: axis codes of the display grid (e.g. "LPS").
    - `source_affine` / `source_shape` / `_to_source`: the original NIfTI grid; `mask_to_nifti` writes a mask back
      onto it, so the mask has exactly the input's shape and affine.
    """

    slices: np.ndarray
    affine: np.ndarray
    is_hu: bool
    source: str = ""
    kind: str = "nifti"  # "nifti" | "dicom"
    source_affine: np.ndarray | None = None
    source_shape: tuple | None = None
    source_header: object = None
    # DICOM series: the slices' headers (no pixel data) in slice order, for DICOM SEG output (shared.core.dicom_seg)
    source_datasets: list | None = field(default=None, repr=False)
    _to_source: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_slices(self) -> int:
        return int(self.slices.shape[0])

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def orientation(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def slice_images(self, window: tuple[float, float] | None = LUNG_WINDOW) -> list[np.ndarray]:
        """The slices as uint8 images: lung window for HU volumes, per-slice min-max otherwise / window=None."""
        from shared.core.preprocessing import minmax_uint8

        if self.is_hu and window is not None:
            return [window_to_uint8(s, *window) for s in self.slices]
        return [minmax_uint8(s) for s in self.slices]

    def mask_to_source_array(self, mask_stack: np.ndarray) -> np.ndarray:
        """(n_slices, rows, cols) display-grid mask -> array on the source voxel grid (NIfTI array order)."""
        import nibabel as nib

        m = np.asarray(mask_stack)
        if m.shape != self.slices.shape:
            raise ValueError(f"mask shape {m.shape} != volume shape {self.slices.shape}")
        ijk = m.transpose(2, 1, 0)  # (i=col, j=row, k=slice)
        if self._to_source is not None:
            ijk = nib.orientations.apply_orientation(ijk, self._to_source)
        # a view, already in NIfTI's Fortran memory order: nibabel writes it without a copy (300 slices of 512^2:
        # 0.2 s instead of 5 s with a C-ordered copy)
        return ijk

    def mask_to_nifti(self, mask_stack: np.ndarray, dtype=np.uint8):
        """A Nifti1Image of the mask on the input's own voxel grid and affine (display grid for DICOM input)."""
        import nibabel as nib

        arr = self.mask_to_source_array(mask_stack).astype(dtype)
        affine = self.source_affine if self.source_affine is not None else self.affine
        img = nib.Nifti1Image(arr, affine)
        if isinstance(self.source_header, nib.Nifti1Header):
            img.header.set_qform(self.source_header.get_qform(), code=int(self.source_header["qform_code"]))
            img.header.set_sform(self.source_header.get_sform(), code=int(self.source_header["sform_code"]))
            img.header.set_xyzt_units(*self.source_header.get_xyzt_units())
        else:
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm")
        img.header.set_data_dtype(dtype)
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
        return img


def is_nifti_path(path) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti_header(path):
    """Open a NIfTI file without reading its voxels (cheap validation) -> the nibabel image."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise ImageDecodeError(f"{path}: not a readable NIfTI volume ({exc})") from None
    if len([s for s in shape if s > 1]) > 3 or len(shape) < 2:
        raise ImageDecodeError(f"{path}: expected a 3-D volume, got shape {shape}")
    return img


def read_nifti(path, hu: bool | None = None) -> Volume:
    """NIfTI volume -> Volume (reoriented to the display grid; the source grid is kept for writing masks).

    `hu=None` guesses whether the values are Hounsfield units (min <= -500 and max >= 0 after scaling).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise ImageDecodeError(f"{path}: not a readable NIfTI volume ({exc})") from None
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ImageDecodeError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    src_ornt = nib.orientations.io_orientation(affine)
    to_display = nib.orientations.ornt_transform(src_ornt, nib.orientations.axcodes2ornt(DISPLAY_AXCODES))
    disp = nib.orientations.apply_orientation(data, to_display)
    disp_affine = affine @ nib.orientations.inv_ornt_aff(to_display, data.shape)
    to_source = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(DISPLAY_AXCODES), src_ornt)
    if hu is None:
        hu = bool(np.nanmin(data) <= -500 and np.nanmax(data) >= 0)
    slices = np.ascontiguousarray(disp.transpose(2, 1, 0), dtype=np.float32)
    return Volume(slices=slices, affine=disp_affine, is_hu=hu, source=str(path), kind="nifti",
                  source_affine=affine, source_shape=tuple(data.shape), source_header=img.header,
                  _to_source=to_source)


def _dicom_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.upper() != "DICOMDIR"]
    out = []
    for p in files:
        try:
            with open(p, "rb") as f:
                head = f.read(132)
        except OSError:
            continue
        if sniff_format(head) == "dicom":
            out.append(p)
    return out


def is_dicom_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and bool(_dicom_files(path))


def read_dicom_series(folder, series_uid: str | None = None) -> Volume:
    """A folder of single-slice DICOM files (one series) -> Volume in Hounsfield units.

    Slices are sorted by ImagePositionPatient projected on the slice normal (row x column direction); the file
    names and InstanceNumber do not matter. When the folder holds several series, the one with the most slices
    is read (or `series_uid`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageDecodeError(f"{folder}: no such folder")
    files = _dicom_files(folder)
    if not files:
        raise ImageDecodeError(f"{folder}: no DICOM files in this folder")
    headers = []
    for p in files:
        ds = _dcmread(str(p), stop_before_pixels=True)
        if "Rows" not in ds or "Columns" not in ds:
            continue  # e.g. a structured report or presentation state next to the images
        headers.append((p, ds))
    if not headers:
        raise ImageDecodeError(f"{folder}: no DICOM image files in this folder")
    by_series: dict[str, list] = {}
    for p, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((p, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            raise ImageDecodeError(f"{folder}: no series {series_uid}")
        chosen = by_series[series_uid]
    else:
        chosen = max(by_series.values(), key=len)
        if len(by_series) > 1:
            warnings.warn(f"{folder} holds {len(by_series)} DICOM series; reading the largest "
                          f"({len(chosen)} slices)", stacklevel=2)
    if len(chosen) == 1 and int(chosen[0][1].get("NumberOfFrames", 1) or 1) > 1:
        return read_dicom_file_volume(chosen[0][0])
    ref = chosen[0][1]
    shape = (int(ref.Rows), int(ref.Columns))
    iop = np.array([float(v) for v in ref.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])], dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
    normal = np.cross(row_dir, col_dir)
    items = []
    for p, ds in chosen:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ImageDecodeError(f"{folder}: slices of different sizes in one series ({p.name})")
        other = np.array([float(v) for v in ds.get("ImageOrientationPatient", iop)], dtype=np.float64)
        if np.abs(other - iop).max() > 1e-3:
            raise ImageDecodeError(f"{folder}: slices with different orientations in one series ({p.name})")
        if "ImagePositionPatient" in ds:
            pos = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        else:
            pos = None
        items.append((p, ds, pos))
    if all(pos is not None for _, _, pos in items):
        items.sort(key=lambda t: float(np.dot(t[2], normal)))
        positions = np.array([t[2] for t in items])
        dists = positions @ normal
        steps = np.diff(dists)
        if len(steps) and np.any(np.abs(steps) < 1e-4):
            raise ImageDecodeError(f"{folder}: two slices at the same position (duplicate files or several "
                                   "acquisitions in one series)")
        dz = float(np.median(steps)) if len(steps) else float(ref.get("SliceThickness", 1) or 1)
        origin = positions[0]
    else:
        items.sort(key=lambda t: int(t[1].get("InstanceNumber", 0) or 0))
        dz = float(ref.get("SpacingBetweenSlices", ref.get("SliceThickness", 1)) or 1)
        origin = np.array([float(v) for v in ref.get("ImagePositionPatient", [0, 0, 0])], dtype=np.float64)
    ps = [float(v) for v in ref.get("PixelSpacing", [1, 1])]  # (row spacing, column spacing)
    slices = np.empty((len(items),) + shape, dtype=np.float32)
    for n, (p, _, _) in enumerate(items):
        ds = _dcmread(str(p))
        arr = _dicom_pixels(ds)
        if arr.ndim != 2:
            raise ImageDecodeError(f"{p}: expected a grayscale slice, got pixel shape {arr.shape}")
        slices[n] = dicom_to_hu(ds, arr)
    # voxel (i=col, j=row, k=slice) -> LPS: origin + i*dc*row_dir + j*dr*col_dir + k*dz*normal; then LPS -> RAS
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = normal * dz
    lps[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return Volume(slices=slices, affine=affine, is_hu=_dicom_is_ct_like(ref), source=str(folder),
                  kind="dicom", source_datasets=[ds for _, ds, _ in items])


def read_dicom_file_volume(path) -> Volume:
    """A single DICOM file as a volume (1 slice, or a multi-frame image's frames in file order)."""
    path = Path(path)
    ds = _dcmread(str(path))
    arr = _dicom_pixels(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[None]
    if arr.ndim != 3:
        raise ImageDecodeError(f"{path}: colour DICOM cannot be read as a CT volume")
    hu = dicom_to_hu(ds, arr)
    iop = np.array([float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    ps = [float(v) for v in ds.get("PixelSpacing", [1, 1])]
    dz = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1)) or 1)
    origin = np.array([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * ps[1], iop[3:] * ps[0], \
        np.cross(iop[:3], iop[3:]) * dz, origin
    return Volume(slices=hu, affine=np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, is_hu=True, source=str(path),
                  kind="dicom")


def read_volume(path, hu: bool | None = None) -> Volume:
    """NIfTI file, DICOM series folder, or single/multi-frame DICOM file -> Volume."""
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_dicom_series(path)
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty file")
    fmt = sniff_file(path)
    if fmt == "nifti" or is_nifti_path(path):
        return read_nifti(path, hu=hu)
    if fmt == "dicom":
        return read_dicom_file_volume(path)
    raise ImageDecodeError(f"{path}: not a volume (expected a NIfTI file or a DICOM series folder)")


def input_kind(path) -> str:
    """"image" | "volume" | "image-folder" for a `covidseg predict` input, from content. ImageDecodeError else."""
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(f"{path}: no such file or folder")
    if path.is_dir():
        if is_dicom_folder(path):
            return "volume"
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()):
            return "image-folder"
        raise ImageDecodeError(f"{path}: empty folder (no images and no DICOM files)")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty file")
    fmt = sniff_file(path)
    if fmt == "nifti" or (fmt is None and is_nifti_path(path)):
        return "volume"
    if fmt == "dicom":
        ds = _dcmread(str(path), stop_before_pixels=True)
        return "volume" if int(ds.get("NumberOfFrames", 1) or 1) > 1 else "image"
    if fmt in ("png", "jpeg", "tiff"):
        return "image"
    with open(path, "rb") as f:
        if f.read(2) == b"BM":
            return "image"
    with open(path, "rb") as f:
        raise ImageDecodeError(f"{path}: {_unknown_format_message(f.read(64))}")


def write_png(path, img: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)
