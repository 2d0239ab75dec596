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
