"""Synthetic CT volumes for the core tests: a DICOM series (pydicom) and NIfTI volumes (nibabel)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

AIR_HU, BLOB_HU = -1000, 100


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
                       slope=1.0, intercept=-1024.0, seed=0) -> list[Path]:
    """One CT series, one file per slice, random file names written in shuffled order, IPP along +z."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = list(range(hu.shape[0]))
    rng = random.Random(seed)
    rng.shuffle(order)
    paths = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", "SYN001"
        ds.InstanceNumber = n + 1  # deliberately NOT the spatial order
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
        p = folder / f"IM{rng.randrange(10**6):06d}_{n}"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data_xyz), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path
