"""The result files of an analysed study (`study_outputs`): report.json, the NIfTI masks, a DICOM SEG for DICOM
series, summary.png and one overlay PNG per slice."""
from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator

import cv2
import numpy as np

from shared.core.dicom_seg import FILE_NAME as DICOM_SEG_FILE
from shared.core.imageio import Volume
from shared.core.study.analysis import StudyAnalysis, _patient_sides
from shared.core.study.errors import THRESHOLD


def _nifti_bytes(volume: Volume, mask: np.ndarray) -> bytes:
    img = volume.mask_to_nifti(mask.astype(np.uint8))
    return gzip.compress(img.to_bytes(), compresslevel=3)  # masks are mostly zeros: level 3 is plenty


def _view_probability(analysis: StudyAnalysis, k: int) -> np.ndarray:
    """The probability shown for slice k: zero outside the lung, and on the right side of the threshold
    everywhere, so the overlay's outline (`prob >= threshold`) is exactly the counted infection."""
    inf = analysis.infection[k] > 0
    if analysis.probability is None:
        return inf.astype(np.float32)
    thr = np.float32(analysis.report.get("model", {}).get("threshold", THRESHOLD))
    p = analysis.probability[k].astype(np.float32)
    p = np.where(inf, np.maximum(p, thr), np.minimum(p, np.nextafter(thr, np.float32(0))))
    return np.where(analysis.lung[k] > 0, p, np.float32(0)).astype(np.float32, copy=False)


#: BGR colour of the lung outline in overlays
LUNG_BGR = (80, 200, 80)


def overlay_slice(gray: np.ndarray, analysis: StudyAnalysis, k: int) -> np.ndarray:
    """BGR overlay of slice k: heatmap + infection outline (shared.core.render) and the lung outline in green."""
    from shared.core.render import overlay_image

    out = overlay_image(gray, _view_probability(analysis, k))
    contours, _ = cv2.findContours(analysis.lung[k].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(out, contours, -1, LUNG_BGR, 1)
    return out


def _fmt_pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f} %"


def summary_png(volume: Volume, analysis: StudyAnalysis, images: list[np.ndarray] | None = None) -> bytes:
    """One page for humans: up to four key slices with overlays, the lesion profile and the numbers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rep = analysis.report
    images = images if images is not None else volume.slice_images()
    keys = [t["index"] for t in rep["top_slices"][:4]]
    if len(keys) < 4:  # fill with the slices of largest lung area, spread over the study
        lung_area = np.count_nonzero(analysis.lung, axis=(1, 2))
        extra = [int(k) for k in np.argsort(-lung_area, kind="stable") if int(k) not in keys]
        step = max(1, len(extra) // (4 - len(keys) + 1))
        keys += extra[::step][:4 - len(keys)]
    keys = sorted(keys)
    fig = Figure(figsize=(13, 7.2), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4, height_ratios=[1.25, 1], hspace=0.28, wspace=0.08)
    area = rep["slice_lesion_area_mm2"]
    sides_shown = _patient_sides(volume)
    for i in range(4):
        ax = fig.add_subplot(grid[0, i])
        ax.axis("off")
        if i < len(keys):
            k = keys[i]
            ax.imshow(cv2.cvtColor(overlay_slice(images[k], analysis, k), cv2.COLOR_BGR2RGB))
            ax.set_title(f"slice {k}: {area[k]:.0f} mm²", fontsize=10)
            for x, side, ha in ((0.02, sides_shown[0], "left"), (0.98, sides_shown[1], "right")):
                if side in ("left", "right"):  # the patient's side at each image edge
                    ax.text(x, 0.5, side[0].upper(), color="white", fontsize=11, ha=ha, va="center",
                            transform=ax.transAxes)
    ax = fig.add_subplot(grid[1, :2])
    ax.fill_between(range(len(area)), np.asarray(area) / 100.0, color="#d9534f", alpha=0.7, step="mid")
    ax.set_xlabel("slice")
    ax.set_ylabel("lesion area (cm²)")
    ax.set_xlim(-0.5, max(len(area) - 0.5, 0.5))
    ax.set_title("lesion area per slice", fontsize=10)
    sides = rep["sides"]
    lines = [f"CT score: {rep['ct_score'] if rep['ct_score'] is not None else 'n/a'}  (0 none, 1 <25 %, "
             "2 25-50, 3 50-75, 4 ≥75 %)",
             f"lung involved: {_fmt_pct(rep['percent_involved'])}",
             f"lesion volume: {rep['lesion_volume_ml']:.1f} mL",
             f"lung volume: {rep['lung_volume_ml']:.1f} mL"]
    for name in ("right", "left"):
        if name in sides:
            s = sides[name]
            lines.append(f"patient {name}: {s['lesion_volume_ml']:.1f} mL of {s['lung_volume_ml']:.1f} mL "
                         f"({_fmt_pct(s['percent_involved'])})")
    sp = rep["spacing_mm"]
    lines += ["", f"{rep['n_slices']} slices, voxel {sp[2]:.2f} x {sp[1]:.2f} x {sp[0]:.2f} mm",
              f"model backend {rep['model'].get('backend')}, threshold {rep['model'].get('threshold')}"]
    lines += [f"warning: {w}" for w in rep.get("warnings", [])]
    lines += ["", "Research use only - not for clinical decisions."]
    tx = fig.add_subplot(grid[1, 2:])
    tx.axis("off")
    tx.text(0.02, 0.98, "\n".join(lines), va="top", ha="left", fontsize=10.5, family="DejaVu Sans",
            transform=tx.transAxes)
    fig.suptitle("covidseg study summary (red: infection heatmap, yellow: lesion outline, green: lung)",
                 fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _dicom_seg_bytes(volume: Volume, analysis: StudyAnalysis) -> bytes | None:
    from shared.core import dicom_seg

    if not volume.source_datasets:
        return None
    model = analysis.report.get("model") or {}
    data, why = dicom_seg.dicom_seg_or_reason(
        volume, [(dicom_seg.INFECTION, analysis.infection), (dicom_seg.LUNG, analysis.lung)],
        weights=model.get("weights"), digest=model.get("weights_digest"), backend=model.get("backend"))
    if data is None:
        analysis.report["dicom_seg"] = None
        analysis.report.setdefault("warnings", []).append(f"DICOM SEG not written ({why})")
    return data


def study_outputs(volume: Volume, analysis: StudyAnalysis, *,
                  overlays: bool = True) -> Iterator[tuple[str, bytes, str]]:
    """The result files of a study as (name, bytes, content type), produced one at a time.

    report.json, mask.nii.gz (infection, on the input's own voxel grid and affine), lung_mask.nii.gz,
    for a DICOM series mask.seg.dcm (a DICOM SEG with the infection and lung segments, referencing the stored,
    de-identified slices), summary.png, then (unless `overlays=False`) overlays/NNNN.png for every slice (NNNN =
    slice index on the display grid, 0 = first slice along the slice normal: the most inferior one for standard
    axial series).

    A SEG that cannot be built is not a failed study: `analysis.report["dicom_seg"]` becomes None and the reason
    is added to its warnings before report.json is produced.
    """
    from shared.core.render import _encode_png

    seg = _dicom_seg_bytes(volume, analysis)
    yield "report.json", json.dumps(analysis.report, indent=1, allow_nan=False).encode(), "application/json"
    yield "mask.nii.gz", _nifti_bytes(volume, analysis.infection), "application/gzip"
    yield "lung_mask.nii.gz", _nifti_bytes(volume, analysis.lung), "application/gzip"
    if seg is not None:
        yield DICOM_SEG_FILE, seg, "application/dicom"
        del seg
    images = volume.slice_images()
    yield "summary.png", summary_png(volume, analysis, images), "image/png"
    for k in range(volume.n_slices if overlays else 0):
        yield f"overlays/{k:04d}.png", _encode_png(overlay_slice(images[k], analysis, k)), "image/png"


def n_outputs(volume: Volume, *, overlays: bool = True) -> int:
    """How many files `study_outputs` yields (for progress bars; one fewer if a DICOM SEG cannot be built)."""
    return 4 + bool(volume.source_datasets) + (volume.n_slices if overlays else 0)
