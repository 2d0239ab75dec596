"""Average the weights of several checkpoints of one run (stochastic weight averaging), then re-estimate the
BatchNorm statistics on training batches.

    python -m training.average --run-dir runs/r1 --checkpoints runs/r1/epochs/e2{5,6,7,8,9}.h5 runs/r1/epochs/e30.h5 \
        --covid-root ../shared/data/covid19-ct-seg-256 --medseg-root ../shared/data/medseg-100-train --out runs/r1/swa.h5
    python -m training.publish --run-dir runs/r1 --checkpoint swa.h5 --covid-root ... --medseg-root ...

Why: the per-epoch validation Dice of a run swings by several points between neighbouring epochs (e.g. 0.59,
0.56, 0.47, 0.59, 0.61 on epochs 11-15 of r1) although the loss falls smoothly; the average of the late
checkpoints of one run sits nearer the centre of that flat region (Izmailov et al. 2018, "Averaging weights leads
to wider optima").

BatchNorm: the averaged network's activations differ from every checkpoint's, so the averaged moving statistics do
not fit it. They are recomputed as the plain mean over `--bn-batches` augmented training batches, made exactly as
the trainer makes them (same crops, augmentation and domain mix), of each batch's statistics (as
torch.optim.swa_utils.update_bn does). Without the data roots the averaged statistics are kept (`--no-bn-update`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from shared.core import model as model_lib  # sets SM_FRAMEWORK before TensorFlow loads


def average(paths) -> tuple[list[np.ndarray], list[dict]]:
    """Element-wise mean of the weights of `paths` (same architecture), and each file's metadata."""
    total, metas = None, []
    for p in paths:
        ours = model_lib.read_weights(p)
        if ours is None:
            raise ValueError(f"{p} is not a covidseg weights file (shared.core.model.save_weights)")
        values, meta = [v.astype(np.float32) for v in ours[0]], ours[1]
        if total is not None and [v.shape for v in values] != [t.shape for t in total]:
            raise ValueError(f"{p} does not have the same weights as {paths[0]}")
        total = values if total is None else [t + v for t, v in zip(total, values)]
        metas.append(meta)
    return [t / len(paths) for t in total], metas


def update_batchnorm(model, batches, n_batches: int) -> int:
    """Reset every BatchNormalization's moving mean/variance to the mean of its per-batch statistics over
    `n_batches` batches of `batches` (forward passes in training mode; no weights other than BN's change)."""
    import tensorflow as tf
    from tqdm import tqdm

    bns = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in bns]
    try:
        for k in tqdm(range(n_batches), desc="BatchNorm statistics", mininterval=5, file=sys.stdout):
            for layer in bns:  # moving = moving * k/(k+1) + batch / (k+1): the running mean of the batch stats
                layer.momentum = k / (k + 1)
            x, _ = next(batches)
            model(tf.constant(x), training=True)
    finally:
        for layer, m in zip(bns, saved):
            layer.momentum = m
    return len(bns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.average", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="the run whose checkpoints are averaged (its state.json "
                                                    "gives the crop size, batch size and domain mix)")
    p.add_argument("--checkpoints", nargs="+", required=True, help="weights files of that run (at least 2)")
    p.add_argument("--out", required=True, help="where to write the averaged weights")
    p.add_argument("--covid-root", help="covid19-ct-seg-256 folder, for the BatchNorm update")
    p.add_argument("--medseg-root", help="medseg-100-train folder, for the BatchNorm update")
    p.add_argument("--bn-batches", type=int, default=100, help="training batches for the BatchNorm update "
                                                               "(default 100)")
    p.add_argument("--no-bn-update", action="store_true", help="keep the averaged BatchNorm statistics")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the BatchNorm batches (default 0)")
    args = p.parse_args(argv)

    paths = [Path(c) for c in args.checkpoints]
    missing = [str(c) for c in paths if not c.is_file()]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    if len(paths) < 2:
        print("error: give at least 2 checkpoints to average", file=sys.stderr)
        return 2
    if not args.no_bn_update and not (args.covid_root or args.medseg_root):
        print("error: the BatchNorm update needs --covid-root and/or --medseg-root (or --no-bn-update)",
              file=sys.stderr)
        return 2
    try:
        values, metas = average(paths)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_lib.configure_devices()
    model = model_lib.build_unet()
    model.set_weights(values)
    n_bn = 0
    if not args.no_bn_update:
        from training import data
        from training.train import _load, batches

        state = json.loads((Path(args.run_dir) / "state.json").read_text())
        run_args = argparse.Namespace(**state["args"])
        train, _, _ = data.split(args.covid_root, args.medseg_root)
        framed = _load(train, getattr(run_args, "framing", "full"))
        n_bn = update_batchnorm(model, batches(framed, run_args, np.random.default_rng(args.seed)), args.bn_batches)
    epochs = [m.get("epoch") for m in metas]
    meta = {"epoch": max((e for e in epochs if e is not None), default=None), "averaged_epochs": epochs,
            "averaged_files": [c.name for c in paths],
            "batchnorm": f"recomputed on {args.bn_batches} training batches" if n_bn else "averaged"}
    out = model_lib.save_weights(model, args.out, metadata=meta)
    print(f"averaged {len(paths)} checkpoints (epochs {epochs}); BatchNorm: {meta['batchnorm']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
