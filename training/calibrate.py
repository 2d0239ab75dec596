"""Choose the decision threshold on TRAINING patients and fold it into the output bias of a weights file.

    python -m training.calibrate --weights /work/runs/r1/best.h5 --out /work/runs/r1/calibrated.h5 \
        --covid-root ../shared/data/covid19-ct-seg-256 --medseg-root ../shared/data/medseg-100-train

Why: trained with BCE on slices that are mostly background, the U-Net is conservative at 0.5 (sensitivity
~0.57, specificity ~0.997 on the held-out sets). Every consumer of the model thresholds at 0.5 (`covidseg
evaluate`, the service's masks and infected fraction), so instead of a second threshold setting the threshold t
that maximizes mean per-image Dice on training slices is folded into the final convolution's bias:
sigmoid(z + log((1 - t) / t)) >= 0.5  <=>  sigmoid(z) >= t. The held-out patients are never looked at; the
choice is the mean over the two domains, like the selection score of `training.publish`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from shared.core import model as model_lib
from training import data

DEFAULT_THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
OUTPUT_LAYER = "final_conv"  # segmentation_models' last Conv2D, followed by the sigmoid


def dice_by_threshold(pairs, thresholds) -> np.ndarray:
    """Per-image Dice, shape (n_images, n_thresholds), of (probability, mask) pairs; mask > 0 is positive.
    An image with no positive pixels in either scores 1."""
    rows = []
    for prob, mask in pairs:
        target = mask > 0
        n_target = int(target.sum())
        row = []
        for t in thresholds:
            pred = prob >= t
            tp = int(np.count_nonzero(pred & target))
            den = int(pred.sum()) + n_target
            row.append(1.0 if den == 0 else 2 * tp / den)
        rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(thresholds))


def choose_threshold(per_domain: dict[str, np.ndarray], thresholds) -> tuple[float, np.ndarray]:
    """-> (threshold with the best mean over domains of mean per-image Dice, that score per threshold).
    Ties go to the threshold closest to 0.5 (the smallest change)."""
    score = np.mean([d.mean(axis=0) for d in per_domain.values()], axis=0)
    order = sorted(range(len(thresholds)), key=lambda i: (-round(float(score[i]), 6), abs(thresholds[i] - 0.5)))
    return float(thresholds[order[0]]), score


def bias_shift(threshold: float) -> float:
    """Logit shift that moves the decision boundary from probability `threshold` to 0.5."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return math.log((1.0 - threshold) / threshold)


def shift_output_bias(model, shift: float, layer_name: str = OUTPUT_LAYER) -> None:
    """Add `shift` to the bias of the convolution that feeds the sigmoid (in place)."""
    layer = model.get_layer(layer_name)
    layer.bias.assign(layer.bias.numpy() + np.float32(shift))


def plot_scores(path: Path, thresholds, per_domain: dict[str, np.ndarray], chosen: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, d in per_domain.items():
        ax.plot(thresholds, d.mean(axis=0), marker="o", label=f"{name} ({len(d)} training slices)")
    ax.axvline(chosen, color="k", ls="--", lw=1, label=f"chosen {chosen:g}")
    ax.set_xlabel("threshold on the uncalibrated probability")
    ax.set_ylabel("mean per-image Dice (training patients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, help="weights file in our format (shared.core.model.save_weights)")
    p.add_argument("--out", required=True, help="where to write the calibrated weights (+ a .png of the scores)")
    p.add_argument("--covid-root", required=True)
    p.add_argument("--medseg-root", required=True)
    p.add_argument("--covid-stride", type=int, default=3,
                   help="use every Nth training slice of covid19-ct-seg-256 (default 3: ~400 slices; "
                        "neighbouring slices are near-duplicates)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
                   help="candidate thresholds (default 0.2 to 0.5 by 0.05)")
    args = p.parse_args(argv)

    thresholds = sorted(set(args.thresholds))
    if args.covid_stride < 1 or not all(0.0 < t < 1.0 for t in thresholds):
        print("error: --covid-stride must be >= 1 and thresholds in (0, 1)", file=sys.stderr)
        return 2
    try:
        ours = model_lib.read_weights(args.weights)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if ours is None:
        print(f"error: {args.weights} is not a covidseg weights file (shared.core.model.save_weights)", file=sys.stderr)
        return 2
    meta = ours[1]
    if meta.get("output_calibration"):
        print(f"error: {args.weights} is already calibrated (threshold "
              f"{meta['output_calibration']['threshold']}); calibrate the uncalibrated checkpoint", file=sys.stderr)
        return 2

    from training.publish import native_probabilities

    model_lib.configure_devices()
    net = model_lib.load_model(args.weights)
    train, _, _ = data.split(args.covid_root, args.medseg_root)
    sets = {"covid19-ct-seg-256": [s for s in train if s.domain == "covid"][::args.covid_stride],
            "medseg-100-train": [s for s in train if s.domain == "medseg"]}
    predict = lambda x: net.predict_on_batch(x)[..., 0]  # noqa: E731
    per_domain = {name: dice_by_threshold(((prob, mask) for _, mask, prob in
                                           native_probabilities(predict, samples, desc=f"calibrate {name}",
                                                                framing=meta.get("framing", "full"))),
                                          thresholds)
                  for name, samples in sets.items() if samples}
    chosen, score = choose_threshold(per_domain, thresholds)
    print("threshold  " + "  ".join(f"{n[:18]:>18s}" for n in per_domain) + "        mean")
    for i, t in enumerate(thresholds):
        print(f"{t:9.2f}  " + "  ".join(f"{d[:, i].mean():18.4f}" for d in per_domain.values())
              + f"  {score[i]:10.4f}" + ("  <- chosen" if t == chosen else ""))
    shift = bias_shift(chosen)
    shift_output_bias(net, shift)
    meta["output_calibration"] = {
        "threshold": chosen, "bias_shift": shift,
        "method": "training.calibrate: the threshold maximizing the mean over domains of mean per-image Dice on "
                  "training-patient slices, folded into final_conv's bias so that 0.5 on the output equals it",
        "n_slices": {n: len(d) for n, d in per_domain.items()},
        "covid_stride": args.covid_stride,
        "train_mean_dice": {f"{t:g}": {n: round(float(d[:, i].mean()), 4) for n, d in per_domain.items()}
                            for i, t in enumerate(thresholds)},
    }
    out = model_lib.save_weights(net, args.out, metadata=meta)
    plot_scores(out.with_suffix(".png"), thresholds, per_domain, chosen)
    print(f"threshold {chosen:g} -> output bias {shift:+.4f}: {out} (scores plotted in {out.with_suffix('.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
