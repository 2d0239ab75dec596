"""DICOM Segmentation (SEG) objects of predicted masks, for PACS viewers (OHIF, 3D Slicer, Weasis, ...).

A DICOM SEG references every source CT slice by its SOP Instance UID and carries one binary frame per slice that
holds a segment (empty frames are omitted), with the source's Frame of Reference, patient and study, so a
viewer overlays it on the series it came from. It is written only for input read from a series of single-frame
DICOM slices (`Volume.source_datasets`); NIfTI input has no UIDs to reference.

Segments are coded as SNOMED CT: infection = Morphologically abnormal structure / Lesion (52988006),
lung = Anatomical structure / Lung (39607008).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILE_NAME = "mask.seg.dcm"  # the SEG's name beside mask.nii.gz (CLI predict, study results, API, bulk fetch)
SEG_SERIES_NUMBER = 9901  # high, so viewers list the SEG after the source series
MANUFACTURER = "covidseg"


class DicomSegError(ValueError):
    """The volume cannot be written as a DICOM SEG (no DICOM source, or a mask that does not fit it)."""


@dataclass(frozen=True)
class Segment:
    """One segment: a display label and which SNOMED CT concept it is (see module docstring)."""

    label: str
    kind: str  # "infection" | "lung"


INFECTION = Segment("COVID-19 infection (GGO + consolidation)", "infection")
LUNG = Segment("Lungs", "lung")


def _description(number: int, segment: Segment, algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if segment.kind == "infection":
        category, prop = codes.cid7150.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    elif segment.kind == "lung":
        category, prop = codes.cid7150.AnatomicalStructure, codes.SCT.Lung
    else:
        raise ValueError(f"unknown segment kind {segment.kind!r}")
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=segment.label, segmented_property_category=category,
        segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)


# Type 2 attributes (present, may be empty) of the Patient and General Study modules that highdicom copies into
# the SEG; de-identified or hand-made series sometimes drop them altogether
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds):
    """A shallow copy of the header with the missing Type 2 attributes added empty (the source is not changed)."""
    missing = [k for k in _TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    out = ds.copy()
    for k in missing:
        setattr(out, k, "")
    return out


def model_identity(weights: str | None, digest: str | None, backend: str | None) -> dict:
    """`model_name`, `model_version` and `software_version` keyword arguments for `build_dicom_seg`, from the
    weights file name, its digest and the inference backend."""
    from pathlib import Path

    from shared import __version__

    name = Path(weights).stem if weights else "covidseg-unet-resnet34"
    version = " ".join(v for v in ((digest or "")[:16], backend or "") if v) or "unknown"
    return {"model_name": name[:64], "model_version": version[:64], "software_version": f"covidseg {__version__}"}


def build_dicom_seg(volume, masks: list[tuple[Segment, np.ndarray]], *, model_name: str, model_version: str,
                    software_version: str = "", series_description: str = "covidseg segmentation"):
    """A highdicom Segmentation (pydicom Dataset) of `masks` on `volume`'s DICOM series.

    `volume`: a `shared.core.imageio.Volume` read from a DICOM series (its `source_datasets`, in slice order).
    `masks`: (segment, (n_slices, rows, cols) array, > 0 = inside) pairs on the volume's display grid.
    Raises DicomSegError when the volume has no DICOM source or a mask's shape differs from the volume's.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = getattr(volume, "source_datasets", None)
    if not sources:
        raise DicomSegError("a DICOM SEG needs a DICOM series as input (NIfTI and multi-frame files have no "
                            "per-slice UIDs to reference)")
    if len(sources) != volume.n_slices:
        raise DicomSegError(f"{len(sources)} source slices for a volume of {volume.n_slices}")
    if not masks:
        raise DicomSegError("no segment to write")
    stack = []
    for segment, m in masks:
        m = np.asarray(m)
        if m.shape != volume.slices.shape:
            raise DicomSegError(f"mask of {segment.label!r} has shape {m.shape}, the volume {volume.slices.shape}")
        stack.append(m > 0)
    pixels = np.stack(stack, axis=-1)  # (frames, rows, cols, segments)
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [_description(i + 1, seg, algorithm) for i, (seg, _) in enumerate(masks)]
    return hd.seg.Segmentation(
        source_images=[_with_type2(ds) for ds in sources], pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=model_name,
        software_versions=software_version or model_version, device_serial_number="0",
        series_description=series_description[:64], content_label="COVIDSEG", omit_empty_frames=True)


def dicom_seg_bytes(volume, masks, **kwargs) -> bytes:
    """`build_dicom_seg` serialised as a DICOM Part 10 file."""
    import io

    buf = io.BytesIO()
    build_dicom_seg(volume, masks, **kwargs).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_seg_or_reason(volume, masks, *, weights: str | None, digest: str | None,
                        backend: str | None) -> tuple[bytes | None, str | None]:
    """(`dicom_seg_bytes`, None), or (None, why) when the source cannot make a SEG: callers have already
    written the NIfTI masks, so a header highdicom rejects (e.g. no FrameOfReferenceUID) costs only this file."""
    try:
        return dicom_seg_bytes(volume, masks, **model_identity(weights, digest, backend)), None
    except Exception as exc:  # noqa: BLE001 - any source header highdicom rejects
        return None, f"{type(exc).__name__}: {exc}"


def read_dicom_seg_masks(data_or_path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a SEG back: ({segment label: (n_source, rows, cols) uint8 mask in the source series' slice order,
    ...}, source SOP Instance UIDs in that order). Used by tests and for checking a written file."""
    import io

    import highdicom as hd
    import pydicom

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else str(data_or_path)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(src))
    uids = [u for _, _, u in seg.get_source_image_uids()]
    out = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                assert_missing_frames_are_empty=True)
        out[label] = arr[..., 0].astype(np.uint8)
    return out, uids
