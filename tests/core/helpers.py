"""Synthetic CT volumes for the core tests: a DICOM series (pydicom) and NIfTI volumes (nibabel)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

AIR_HU, BLOB_HU = -1000, 100
FIXTURE_SLICES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "slices").glob("covid_*.png"))


def fixture_slice_hu(path: Path, size: int | None = None) -> np.ndarray:
    """A real fixture slice (8-bit PNG, lung window) back in Hounsfield units, float32: gray 0..255 ->
    -1350..150 HU; resized to size x size (bicubic) when given."""
    import cv2

    g = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
    if size is not None:
        g = cv2.resize(g, (size, size), interpolation=cv2.INTER_CUBIC)
    return g * (1500.0 / 255.0) - 1350.0


def blob_volume(shape_zyx=(5, 40, 48), centres=None, radius=6) -> tuple[np.ndarray, list]:
    """HU stack (z, rows, cols): air with one bright disc per slice except slice 0; returns (hu, centres)."""
    z, h, w = shape_zyx
    hu = np.full(shape_zyx, AIR_HU, np.int16)
    yy, xx = np.mgrid[:h, :w]
    centres = centres or [None] + [(10 + 4 * k, 12 + 5 * k) for k in range(1, z)]
    for k, c in enumerate(centres):
        if c is not None:
            hu[k][(yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius ** 2] = BLOB_HU
    return hu, centres


def write_dicom_series(folder: Path, hu: np.ndarray, spacing=(0.8, 0.7), dz=2.5, origin=(-20.0, -15.0, 40.0),
                       slope=1.0, intercept=-1024.0, seed=0, *, order: str = "shuffled", names=None,
                       patient=("Synthetic^Phantom", "SYN001")) -> list[Path]:
    """One CT series from an HU stack (z, rows, cols), one file per slice, IPP along +z.

    `order` is the order the slices are written and numbered (InstanceNumber): "shuffled" (seeded; random
    file names), "reversed" or "spatial". `names` are the file
    names in write order (default IM<random>_<n> when shuffled, IM<nnnn>.dcm otherwise). `spacing` is
    (row, column) mm. Also used by scripts/bench_studies.py (one DICOM builder for tests and benchmarks).
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = random.Random(seed)
    idx = list(range(hu.shape[0]))
    if order == "shuffled":
        rng.shuffle(idx)
    elif order == "reversed":
        idx.reverse()
    elif order != "spatial":
        raise ValueError(f"order: shuffled, reversed or spatial, not {order!r}")
    paths = []
    for n, k in enumerate(idx):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = patient
        ds.InstanceNumber = n + 1  # write order, deliberately not necessarily the spatial order
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * dz]
        ds.PixelSpacing = [spacing[0], spacing[1]]  # row spacing, column spacing
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[k].astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        if names:
            p = folder / names[n]
        elif order == "shuffled":
            p = folder / f"IM{rng.randrange(10**6):06d}_{n}"
        else:
            p = folder / f"IM{n:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data_xyz), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path
