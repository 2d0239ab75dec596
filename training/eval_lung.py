"""Measure lung masks (`shared.core.lung.segment_lungs`: learned U-Net or classical) against the expert lung masks.

    python -m training.eval_lung --covid-root ../shared/data/covid19-ct-seg-256 [--method learned|classical]
        [--groups val|train|all] [--include none|predicted|expert] [--weights W] [--json OUT]

Reports per patient group and overall: lung Dice (mean per image, median, min, and global, i.e. pooled over all
pixels) and the infection coverage: the share of expert infection pixels (masks/) that fall inside the lung mask
(pooled). The default `--groups val` is the held-out patients of `training.data.split`: neither the classical
parameters nor the learned model saw them. `--include predicted` merges the infection model's own prediction into
the lung mask (what a study report does); `--include expert` merges the expert infection mask (an oracle, an
upper bound only, never a headline number).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from shared.core.lung import LUNG_METHODS, segment_lungs
from training.data import read_gray, read_mask, split

INCLUDE_CHOICES = ("none", "predicted", "expert")
#: Slices per `segment_lungs` call (one model batch; progress is updated per chunk).
CHUNK = 32


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _predicted_infection(grays, segmenter, threshold: float = 0.5) -> list[np.ndarray]:
    return [p >= threshold for p in segmenter.predict(grays)]


def evaluate(samples, method: str = "learned", include: str = "none", weights=None, segmenter=None,
             progress: bool = True) -> dict:
    """Samples with lung masks -> {"groups": {group: row}, "overall": row, "images": [...]}.

    method: "learned" (the lung U-Net; FileNotFoundError without weights), "classical" or "auto".
    include: "none"; "predicted" merges `segmenter`'s infection prediction (a `shared.core.inference.Segmenter`);
    "expert" merges the expert infection mask (oracle).
    """
    if include not in INCLUDE_CHOICES:
        raise ValueError(f"include must be one of {INCLUDE_CHOICES}, not {include!r}")
    if include == "predicted" and segmenter is None:
        raise ValueError("include='predicted' needs an infection segmenter")
    per_image = []
    acc = defaultdict(lambda: np.zeros(5))   # inter, pred+gt, inf_in, inf_total, n
    bar = tqdm(total=len(samples), desc=f"lung masks ({method})", unit="img", disable=not progress,
               file=sys.stderr)
    for i in range(0, len(samples), CHUNK):
        chunk = samples[i:i + CHUNK]
        grays = [read_gray(s.image) for s in chunk]
        infs = [read_mask(s.mask) > 0 for s in chunk]
        incs = {"none": None, "expert": infs}.get(include)
        if include == "predicted":
            incs = _predicted_infection(grays, segmenter)
        preds = segment_lungs(grays, include=incs, method=method, weights=weights)
        for s, pred, inf in zip(chunk, preds, infs):
            gt = read_mask(s.lung_mask) > 0
            d = _dice(pred, gt)
            inf_in, inf_tot = int((pred & inf).sum()), int(inf.sum())
            cov = inf_in / inf_tot if inf_tot else None
            per_image.append({"image": s.image.name, "group": s.group, "dice": d, "infection_coverage": cov,
                              "lung_fraction_pred": float(pred.mean()), "lung_fraction_gt": float(gt.mean())})
            for key in (s.group, "__all__"):
                acc[key] += (int((pred & gt).sum()), int(pred.sum() + gt.sum()), inf_in, inf_tot, 1)
        bar.update(len(chunk))
    bar.close()

    def row(key: str) -> dict:
        rows = [r for r in per_image if key == "__all__" or r["group"] == key]
        inter, tot, inf_in, inf_tot, n = acc[key]
        covs = [r["infection_coverage"] for r in rows if r["infection_coverage"] is not None]
        dices = np.array([r["dice"] for r in rows])
        return {"images": int(n), "dice_mean": float(dices.mean()), "dice_median": float(np.median(dices)),
                "dice_min": float(dices.min()), "dice_global": float(2 * inter / tot) if tot else 1.0,
                "infection_coverage": float(inf_in / inf_tot) if inf_tot else None,
                "infection_coverage_mean": float(np.mean(covs)) if covs else None}

    groups = sorted({r["group"] for r in per_image})
    return {"groups": {g: row(g) for g in groups}, "overall": row("__all__"), "images": per_image}


def print_table(result: dict) -> None:
    head = f"{'patient group':<26}{'n':>5}{'Dice mean':>11}{'median':>8}{'min':>7}{'global':>8}{'inf.cov':>9}"
    print(head)
    print("-" * len(head))
    items = list(result["groups"].items()) + [("ALL", result["overall"])]
    for i, (g, r) in enumerate(items):
        if i == len(items) - 1:
            print("-" * len(head))
        cov = "n/a" if r["infection_coverage"] is None else f"{r['infection_coverage']:.4f}"
        print(f"{g:<26}{r['images']:>5}{r['dice_mean']:>11.4f}{r['dice_median']:>8.4f}{r['dice_min']:>7.3f}"
              f"{r['dice_global']:>8.4f}{cov:>9}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.eval_lung", description=__doc__.splitlines()[0])
    ap.add_argument("--covid-root", required=True, help="covid19-ct-seg-256 directory (images/, lung-masks/, masks/)")
    ap.add_argument("--method", choices=LUNG_METHODS, default="learned",
                    help="learned U-Net (default), classical rules, or auto (learned when its weights load)")
    ap.add_argument("--weights", help="lung model weights (default: weights/covidseg-lung-unet-small.h5)")
    ap.add_argument("--groups", choices=("val", "train", "all"), default="val",
                    help="held-out patient groups (default), training groups, or all")
    ap.add_argument("--include", choices=INCLUDE_CHOICES, default="none",
                    help="merge an infection mask into the lung mask: the infection model's prediction, or the "
                         "expert mask (oracle upper bound)")
    ap.add_argument("--include-infection", action="store_true", help="same as --include expert (kept for scripts)")
    ap.add_argument("--infection-weights", help="infection model weights for --include predicted (default shipped)")
    ap.add_argument("--infection-backend", default="fp32", help="infection model backend (default fp32)")
    ap.add_argument("--json", help="write the summary and per-image rows to this JSON file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    include = "expert" if args.include_infection else args.include

    train, val, _ = split(args.covid_root)
    samples = {"val": val, "train": train, "all": train + val}[args.groups]
    samples = [s for s in samples if s.lung_mask is not None]
    if not samples:
        ap.error(f"no slices with lung masks under {args.covid_root}")
    segmenter = None
    if include == "predicted":
        from shared.core.inference import Segmenter

        segmenter = Segmenter(weights=args.infection_weights, backend=args.infection_backend)
    t0 = time.perf_counter()
    try:
        result = evaluate(samples, method=args.method, include=include, weights=args.weights, segmenter=segmenter,
                          progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    extra = {"none": "", "predicted": ", predicted infection merged",
             "expert": ", expert infection merged (oracle)"}[include]
    print(f"lung masks ({args.method}, {args.groups} groups{extra}): {len(samples)} slices, "
          f"{1000 * elapsed / len(samples):.0f} ms/slice")
    print_table(result)
    if args.json:
        result["meta"] = {"covid_root": str(args.covid_root), "groups": args.groups, "seconds": elapsed,
                          "method": args.method, "weights": args.weights, "include": include}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
