"""Measure the classical lung mask (`shared.lung.lung_mask_slice`) against the expert lung masks.

    python -m training.eval_lung --covid-root ../shared/data/covid19-ct-seg-256 [--groups val|train|all] [--json OUT]

Reports per patient group and overall: lung Dice (mean per image and global, i.e. pooled over all pixels) and the
infection coverage: the share of expert infection pixels (masks/) that fall inside the lung mask (pooled, and the
mean per image). The default `--groups val` is the held-out patients of `training.data.split`; the parameters of
`shared.lung` were tuned on the training groups only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from shared.lung import lung_mask_slice
from training.data import read_gray, read_mask, split


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def evaluate(samples, progress: bool = True, include_infection: bool = False) -> dict:
    """Samples with lung masks -> {"groups": {group: row}, "overall": row, "images": [...]}.

    include_infection: pass the EXPERT infection mask as `include=` (an oracle: the upper bound of merging the
    model's predicted infection into the lung mask for percent involvement).
    """
    per_image = []
    acc = defaultdict(lambda: np.zeros(5))   # inter, pred+gt, inf_in, inf_total, n
    for s in tqdm(samples, desc="lung masks", unit="img", disable=not progress, file=sys.stderr):
        gray = read_gray(s.image)
        gt = read_mask(s.lung_mask) > 0
        inf = read_mask(s.mask) > 0
        pred = lung_mask_slice(gray, include=inf if include_infection else None)
        d = _dice(pred, gt)
        inf_in, inf_tot = int((pred & inf).sum()), int(inf.sum())
        cov = inf_in / inf_tot if inf_tot else None
        per_image.append({"image": s.image.name, "group": s.group, "dice": d, "infection_coverage": cov,
                          "lung_fraction_pred": float(pred.mean()), "lung_fraction_gt": float(gt.mean())})
        for key in (s.group, "__all__"):
            acc[key] += (int((pred & gt).sum()), int(pred.sum() + gt.sum()), inf_in, inf_tot, 1)

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
    ap.add_argument("--groups", choices=("val", "train", "all"), default="val",
                    help="held-out patient groups (default), training groups, or all")
    ap.add_argument("--json", help="write the summary and per-image rows to this JSON file")
    ap.add_argument("--include-infection", action="store_true",
                    help="oracle: merge the expert infection mask into the lung mask (lung_mask_slice include=)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    train, val, _ = split(args.covid_root)
    samples = {"val": val, "train": train, "all": train + val}[args.groups]
    samples = [s for s in samples if s.lung_mask is not None]
    if not samples:
        ap.error(f"no slices with lung masks under {args.covid_root}")
    t0 = time.perf_counter()
    result = evaluate(samples, progress=not args.no_progress, include_infection=args.include_infection)
    elapsed = time.perf_counter() - t0
    oracle = ", expert infection merged (oracle)" if args.include_infection else ""
    print(f"lung masks ({args.groups} groups{oracle}): {len(samples)} slices, "
          f"{1000 * elapsed / len(samples):.0f} ms/slice")
    print_table(result)
    if args.json:
        result["meta"] = {"covid_root": str(args.covid_root), "groups": args.groups, "seconds": elapsed,
                          "include_infection": args.include_infection}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
