"""Measure what lung framing (`shared.core.framing`) does to the training data, before any model is trained on it.

    python -m training.framing_report --covid-root ../shared/data/covid19-ct-seg-256 \
        --medseg-root ../shared/data/medseg-100-train --json docs/cv/framing.json --plot docs/cv/framing.png

Per dataset: how much of each slice the lung frame keeps (area fraction and the linear zoom it gives on the 448
canvas), and how much of the experts' infection mask falls outside the frame (what lung framing would lose for
good, since the model never sees it). Prints a table, writes JSON and (--plot) a PNG of examples.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def measure(samples, batch_size: int = 32) -> dict:
    from tqdm import tqdm

    from shared.core.framing import frame_slices
    from training import data

    area, zoom, lost_px, total_px, lossy = [], [], 0, 0, 0
    for i in tqdm(range(0, len(samples), batch_size), desc="framing", mininterval=5, file=sys.stdout):
        chunk = samples[i:i + batch_size]
        imgs = [data.read_gray(s.image) for s in chunk]
        masks = [data.read_mask(s.mask) > 0 for s in chunk]
        for f, m in zip(frame_slices(imgs, "lung"), masks):
            fa = (f.bottom - f.top) * (f.right - f.left) / (f.height * f.width)
            area.append(fa)
            zoom.append(float(np.sqrt(1 / fa)))
            inside = int(f.crop(m.astype(np.uint8)).sum())
            lost = int(m.sum()) - inside
            lost_px += lost
            total_px += int(m.sum())
            lossy += lost > 0
    return {"n_slices": len(samples), "frame_area_fraction_mean": float(np.mean(area)),
            "frame_area_fraction_p5": float(np.percentile(area, 5)), "zoom_mean": float(np.mean(zoom)),
            "whole_slice_frames": int(sum(a >= 0.999 for a in area)),
            "infection_pixels_outside_frame": lost_px, "infection_pixels": total_px,
            "infection_fraction_outside_frame": lost_px / total_px if total_px else 0.0,
            "slices_losing_infection": int(lossy)}


def plot_examples(samples, out_png, n: int = 4) -> None:
    """Rows: n slices with their lung frame drawn; the 448 model input each gives, full and lung-framed."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.core.framing import frame_slices
    from shared.core.preprocessing import preprocess
    from training import data

    picks = [samples[int(i)] for i in np.linspace(0, len(samples) - 1, n).round()]
    imgs = [data.read_gray(s.image) for s in picks]
    fig, axes = plt.subplots(n, 3, figsize=(9, 3 * n))
    for row, (s, img, f) in enumerate(zip(picks, imgs, frame_slices(imgs, "lung"))):
        boxed = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        cv2.rectangle(boxed, (f.left, f.top), (f.right - 1, f.bottom - 1), (255, 60, 60), 2)
        mask = data.read_mask(s.mask) > 0
        for col, (title, pic) in enumerate((
                (f"{s.domain} {s.image.name}: lung frame", boxed),
                ("model input, full", preprocess(img)),
                ("model input, lung-framed" + (" (whole: pre-cropped)" if f.is_whole else ""), preprocess(f.crop(img))))):
            ax = axes[row, col]
            ax.imshow(pic, cmap="gray")
            if col == 2:
                m = cv2.resize(f.crop(mask.astype(np.uint8)), (448, 448), interpolation=cv2.INTER_NEAREST)
                ax.contour(m, levels=[0.5], colors="yellow", linewidths=0.7)
            elif col == 1:
                m = cv2.resize(mask.astype(np.uint8), (448, 448), interpolation=cv2.INTER_NEAREST)
                ax.contour(m, levels=[0.5], colors="yellow", linewidths=0.7)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    from training import data

    p = argparse.ArgumentParser(prog="python -m training.framing_report", description=__doc__.split("\n")[0])
    p.add_argument("--covid-root", required=True)
    p.add_argument("--medseg-root", required=True)
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--plot", help="write example slices, full and lung-framed (infection outlined), as PNG here")
    args = p.parse_args(argv)
    train, val_c, val_m = data.split(args.covid_root, args.medseg_root, fold="all")
    sets = {"covid19-ct-seg-256": [s for s in train if s.domain != "medseg"],
            "medseg-100-train": [s for s in train if s.domain == "medseg"]}
    out = {name: measure(samples) for name, samples in sets.items()}
    print("| set | slices | frame area (mean, p5) | zoom (mean) | whole-slice frames | infection outside frame "
          "| slices losing infection |\n| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in out.items():
        print(f"| {name} | {r['n_slices']} | {r['frame_area_fraction_mean']:.2f}, {r['frame_area_fraction_p5']:.2f} "
              f"| {r['zoom_mean']:.2f}x | {r['whole_slice_frames']} | {100 * r['infection_fraction_outside_frame']:.2f} % "
              f"| {r['slices_losing_infection']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.plot:
        plot_examples(sets["covid19-ct-seg-256"][::97][:3] + sets["medseg-100-train"][7:8], args.plot, n=4)
        print(f"examples: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
