"""Segmentation metrics on binary masks. Every function names its reduction."""
from __future__ import annotations

import numpy as np


def confusion_counts(pred, target) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) pixel counts of two same-shape boolean masks."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: prediction {p.shape} vs target {t.shape}")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    return tp, fp, fn, int(p.size - tp - fp - fn)


def dice_iou_counts(pred, target) -> tuple[float, float]:
    """Per-image (Dice, IoU). Both empty counts as a perfect 1.0 (nothing to find, nothing found)."""
    tp, fp, fn, _ = confusion_counts(pred, target)
    denom = 2 * tp + fp + fn
    if denom == 0:
        return 1.0, 1.0
    return 2 * tp / denom, tp / (tp + fp + fn)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def image_scores(name: str, pred, target) -> dict:
    """Per-image record: name, dice, iou, sensitivity, specificity (None when undefined), tp/fp/fn/tn, pixels."""
    tp, fp, fn, tn = confusion_counts(pred, target)
    dice, iou = dice_iou_counts(pred, target)
    return {"name": name, "dice": dice, "iou": iou, "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "pixels": tp + fp + fn + tn}


def aggregate(per_image: list[dict]) -> dict:
    """Evaluation summary from `image_scores` records.

    - mean_dice / mean_iou: mean of the per-image values (an image with empty mask and empty prediction is 1.0).
    - global_dice / global_iou: from the pixel counts summed over all images (big lesions weigh more).
    - sensitivity = sum TP / sum (TP + FN); specificity = sum TN / sum (TN + FP) (pixel level, summed counts);
      None when undefined (no positive / no negative pixel at all).
    """
    n = len(per_image)
    tp = sum(r["tp"] for r in per_image)
    fp = sum(r["fp"] for r in per_image)
    fn = sum(r["fn"] for r in per_image)
    tn = sum(r["tn"] for r in per_image)
    gd = 2 * tp + fp + fn
    return {
        "n_images": n,
        "mean_dice": float(np.mean([r["dice"] for r in per_image])) if n else None,
        "global_dice": (2 * tp / gd if gd else 1.0) if n else None,
        "mean_iou": float(np.mean([r["iou"] for r in per_image])) if n else None,
        "global_iou": (tp / (tp + fp + fn) if (tp + fp + fn) else 1.0) if n else None,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


#: the summary keys of `aggregate` that evaluations report, overall and per group (the pixel counts stay in the
#: per-image records)
SUMMARY_KEYS = ("n_images", "mean_dice", "global_dice", "mean_iou", "global_iou", "sensitivity", "specificity")


def aggregate_groups(per_image: list[dict], group_of: dict[str, str], missing: str = "ungrouped") -> dict:
    """`aggregate` per group (e.g. per patient), groups in name order; an image whose name is not in
    `group_of` counts under `missing`. Reduction: within each group as in `aggregate`."""
    by: dict[str, list[dict]] = {}
    for r in per_image:
        by.setdefault(group_of.get(r["name"], missing), []).append(r)
    return {g: {k: aggregate(rs)[k] for k in SUMMARY_KEYS} for g, rs in sorted(by.items())}


#: infection size bins as fractions of the slice: 0.75 % is ~500 pixels of a 256² slice, where most lost
#: slices are; 7.5 % is ~5,000
INFECTION_SIZE_EDGES = (0.0075, 0.075)


def infection_size_groups(per_image: list[dict], edges: tuple[float, ...] = INFECTION_SIZE_EDGES) -> dict[str, str]:
    """Image name -> its bin by the annotated infection's share of the slice, (tp + fn) / pixels, for
    `aggregate_groups`. Labels sort in size order: "0: none", "1: < 0.75 %", "2: 0.75–7.5 %", "3: ≥ 7.5 %"."""
    def pct(e: float) -> str:
        return f"{e * 100:g} %"

    labels = ["0: none", f"1: < {pct(edges[0])}"]
    labels += [f"{i + 2}: {pct(lo)[:-2]}–{pct(hi)}" for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
    labels.append(f"{len(edges) + 1}: ≥ {pct(edges[-1])}")
    out = {}
    for r in per_image:
        share = (r["tp"] + r["fn"]) / r["pixels"] if r["pixels"] else 0.0
        out[r["name"]] = labels[0] if share == 0 else labels[1 + int(np.searchsorted(edges, share, side="right"))]
    return out
