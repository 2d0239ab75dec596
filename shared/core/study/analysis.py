"""Loading a normalised study folder (`load_study`) and analysing it (`analyse_study` -> `StudyAnalysis`):
infection and lung masks, volumes, percent involved, CT score and the report.json dict.

Left/right in reports are the PATIENT's sides, from the volume's affine (radiological display: the image-left
lung is the patient's right lung when the columns run towards the patient's left, as in standard DICOM axials).

No TensorFlow import here (the Segmenter is passed in).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from shared.core import imageio
from shared.core.dicom_seg import FILE_NAME as DICOM_SEG_FILE
from shared.core.imageio import ImageDecodeError, Volume
from shared.core.study.errors import NIFTI_NAME, THRESHOLD, StudyCancelled, StudyError

# ==============================================================================================================
# loading
# ==============================================================================================================
def load_study(folder: Path) -> Volume:
    """A normalised study folder (from `unpack_study_upload`) -> Volume: HU, display grid, geometry kept."""
    folder = Path(folder)
    try:
        if (folder / NIFTI_NAME).is_file():
            return imageio.read_nifti(folder / NIFTI_NAME)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return imageio.read_dicom_series(folder)
    except ImageDecodeError as exc:
        raise StudyError(f"cannot read the study: {exc}") from None


# ==============================================================================================================
# analysis
# ==============================================================================================================
@dataclass
class StudyAnalysis:
    """Result of `analyse_study` on the volume's display grid (z, y, x) = (slice, row, column).

    `infection`: uint8 0/1, predicted infection inside the lung (the lesion mask written as mask.nii.gz);
    `lung`: uint8 0/1 lung mask (predicted infection touching the lung merged in); `probability`: the model's
    output as float16, for display (None when not kept; the masks come from the float32 output); `report`: the
    report.json dict.
    """

    infection: np.ndarray
    lung: np.ndarray
    report: dict
    probability: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def ct_score(percent: float | None) -> int | None:
    """CT severity score from percent of lung involved: 0 none, 1 < 25 %, 2 25-50, 3 50-75, 4 >= 75."""
    if percent is None:
        return None
    if percent <= 0:
        return 0
    return 1 if percent < 25 else 2 if percent < 50 else 3 if percent < 75 else 4


def _lung_method() -> str:
    from shared.core import lung

    describe = getattr(lung, "lung_method", None)
    if callable(describe):
        try:
            return str(describe())
        except Exception:  # noqa: BLE001 - a description must never fail an analysis
            pass
    return "shared.core.lung.segment_lungs (lung-windowed 8-bit slices) with predicted infection merged"


def _patient_sides(volume: Volume) -> tuple[str, str]:
    """Patient side of (image-left columns, image-right columns), from the column axis of the affine."""
    import nibabel as nib

    code = nib.aff2axcodes(volume.affine)[0]
    if code == "L":   # columns run towards the patient's left: image-left is the patient's right
        return "right", "left"
    if code == "R":
        return "left", "right"
    return "image_left", "image_right"  # columns not left-right (not an axial grid): say so, do not guess


def _volumes(infection: np.ndarray, lung: np.ndarray, voxel_mm3: float) -> dict:
    n_les, n_lung = int(np.count_nonzero(infection)), int(np.count_nonzero(lung))
    lesion_ml = n_les * voxel_mm3 / 1000.0
    lung_ml = n_lung * voxel_mm3 / 1000.0
    percent = 100.0 * n_les / n_lung if n_lung else None
    return {"lesion_volume_ml": lesion_ml, "lung_volume_ml": lung_ml, "percent_involved": percent,
            "ct_score": ct_score(percent), "lesion_voxels": n_les, "lung_voxels": n_lung}


def analyse_study(volume: Volume, segmenter, *, batch_size: int = 8,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, threshold: float = THRESHOLD,
                  keep_probability: bool = True) -> StudyAnalysis:
    """Segment infection and lungs in every slice and measure them.

    Slices are lung-windowed (HU volumes) and run through `segmenter.predict` `batch_size` at a time; the lung
    masks of a batch are computed right after it (`shared.core.lung.segment_lungs`, with the predicted infection
    merged in, since dense consolidation is lung). `progress(done_slices, total_slices)` is called after every
    batch; `should_stop()` is asked before every batch and raises StudyCancelled when it returns True.

    Infection = `prob >= threshold` inside the lung mask (predictions not touching the lung are outside the
    lungs and not counted; their volume is reported as `predicted_outside_lung_ml`). Lesion mL = lesion voxel
    count x voxel volume / 1000; percent involved = lesion voxels / lung voxels x 100 (null, with a warning,
    when no lung is found); `ct_score` from it (see `ct_score`).

    Report extras beyond the contract: `sides` are the PATIENT's left and right (from the affine's column axis;
    "image_left"/"image_right" if the columns do not run left-right); slice indices (`top_slices`,
    `slice_lesion_area_mm2`, overlays/NNNN.png) count along the display grid's slice axis, whose direction is
    the third letter of `orientation` (e.g. "LPS": index 0 is the most inferior slice); `lesion_voxels`,
    `lung_voxels`, `predicted_outside_lung_ml`, `is_hu`, `warnings`.
    """
    from shared.core import lung as lung_lib

    n = volume.n_slices
    if n == 0:
        raise StudyError("the study has no slices")
    bs = max(1, int(batch_size))
    images = volume.slice_images()
    shape = volume.slices.shape
    prob = np.zeros(shape, np.float16) if keep_probability else None  # for display only: half the memory
    predicted = np.zeros(shape, np.uint8)
    lung = np.zeros(shape, np.uint8)
    for start in range(0, n, bs):
        if should_stop is not None and should_stop():
            raise StudyCancelled(f"stopped after {start} of {n} slices")
        chunk = images[start:start + bs]
        probs = segmenter.predict(chunk, batch_size=bs)
        inf = [(p >= threshold) for p in probs]
        lungs = lung_lib.segment_lungs(chunk, include=inf)
        for k, (p, m, lm) in enumerate(zip(probs, inf, lungs)):
            predicted[start + k] = m
            lung[start + k] = np.asarray(lm, dtype=bool) | (m & _touching(m, lm))
            if prob is not None:
                prob[start + k] = p
        if progress is not None:
            progress(min(start + bs, n), n)
    infection = (predicted & lung).astype(np.uint8)
    report = _report(volume, infection, lung, predicted, segmenter, threshold)
    return StudyAnalysis(infection=infection, lung=lung, report=report, probability=prob)


def _touching(inf: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Components of `inf` that overlap `lung` (the infection a lung mask should contain)."""
    lung = np.asarray(lung, dtype=bool)
    if not inf.any() or not lung.any():
        return np.zeros(inf.shape, bool)
    n, lab = cv2.connectedComponents(inf.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(lab[lung & inf])] = True
    keep[0] = False
    return keep[lab]


def _report(volume: Volume, infection, lung, predicted, segmenter, threshold) -> dict:
    from shared.core import lung as lung_lib

    dx, dy, dz = volume.spacing
    voxel_mm3 = float(dx * dy * dz)
    totals = _volumes(infection, lung, voxel_mm3)
    img_left, img_right = lung_lib.split_sides(lung.astype(bool))
    names = _patient_sides(volume)
    sides = {}
    for name, part in zip(names, (img_left, img_right)):
        sides[name] = {k: v for k, v in _volumes(infection & part, part, voxel_mm3).items()
                       if not k.endswith("_voxels")}
    area = np.count_nonzero(infection, axis=(1, 2)) * float(dx * dy)
    order = sorted((k for k in range(len(area)) if area[k] > 0), key=lambda k: (-area[k], k))[:5]
    outside = int(np.count_nonzero(predicted)) - totals["lesion_voxels"]
    model = {"backend": getattr(segmenter, "backend", None),
             "preprocessing": getattr(segmenter, "preprocessing", None), "threshold": float(threshold)}
    try:
        model["weights_digest"] = segmenter.digest
        model["weights"] = Path(segmenter.weights).name if getattr(segmenter, "weights", None) else None
    except Exception:  # noqa: BLE001 - a stand-in segmenter without weights
        model["weights_digest"] = None
    return {
        "lesion_volume_ml": totals["lesion_volume_ml"], "lung_volume_ml": totals["lung_volume_ml"],
        "percent_involved": totals["percent_involved"], "ct_score": totals["ct_score"],
        "sides": sides,
        "lesion_voxels": totals["lesion_voxels"], "lung_voxels": totals["lung_voxels"],
        "predicted_outside_lung_ml": outside * voxel_mm3 / 1000.0,
        "voxel_volume_mm3": voxel_mm3, "spacing_mm": [float(dz), float(dy), float(dx)],
        "shape": [int(v) for v in infection.shape], "n_slices": int(infection.shape[0]),
        "orientation": volume.orientation, "is_hu": bool(volume.is_hu),
        "top_slices": [{"index": int(k), "lesion_area_mm2": float(area[k])} for k in order],
        "slice_lesion_area_mm2": [float(a) for a in area],
        "model": model, "lung_method": _lung_method(),
        "dicom_seg": DICOM_SEG_FILE if volume.source_datasets else None,
        "warnings": ([] if totals["lung_voxels"] else
                     ["no lung found: percent involved and CT score are unknown"]),
    }
