"""Train the small lung U-Net (`shared.core.lung_model`) on the expert lung masks of covid19-ct-seg-256.

    nice -n 10 python -m training.train_lung --covid-root ../shared/data/covid19-ct-seg-256 --run-dir runs/lung \\
        [--publish weights/covidseg-lung-unet-small.h5]

Choices (2 shared CPU cores, ~15 minutes):
- Data: the training patient groups of `training.data.split` only; the held-out groups are evaluated after every
  epoch for the log, never used to pick weights (the final epoch is published).
- Input: exactly `shared.core.lung_model.prepare_lung_input` (letterbox, `shared.core.preprocessing` min-max + CLAHE) at
  128 px when augmentation is off. Augmentation acts on the native slice before that recipe: one affine warp
  (flip left-right, flip up-down as some volumes are stored upside down, rotation +-12 degrees, scale +-15 %,
  shift), a display-window jitter (upper clip near soft tissue, as a lung window does), the infection model's
  gamma/contrast/blur/noise/JPEG jitter and a CLAHE-strength jitter.
- Loss: binary cross-entropy + (1 - soft Dice per image); Adam, short warm-up then cosine decay; seed fixed.
- Outputs in --run-dir: log.csv (per epoch), a resumable tf.train checkpoint (weights + optimizer + epoch),
  lung.h5 (final weights, float16, `shared.core.model.save_weights`) and card.json; `--publish PATH` copies the
  weights there and writes the model card next to it (PATH with .json).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from shared.core import model as model_lib  # sets the TF/Keras environment first
from shared.core.lung_model import LUNG_FILTERS, LUNG_INPUT_SIZE, LungModel, build_lung_unet, letterbox
from shared.core.preprocessing import CLAHE_CLIP, normalize_appearance, resize_to_input
from training import data
from training.augment import _appearance  # the infection model's appearance jitter, shared on purpose

DEFAULTS = dict(epochs=8, steps_per_epoch=75, batch_size=16, lr=2e-3, min_lr=1e-5, warmup_steps=40, seed=7)


# ---------------------------------------------------------------------------------------------------- examples


def _affine(side: int, rng: np.random.Generator) -> np.ndarray:
    """Flip/rotate/scale/shift about the centre of a side x side image (2x3 float32)."""
    a = math.radians(rng.uniform(-12, 12))
    s = math.exp(rng.uniform(-0.15, 0.15))
    lin = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    if rng.random() < 0.5:
        lin = lin @ np.diag([-1.0, 1.0])
    if rng.random() < 0.25:
        lin = lin @ np.diag([1.0, -1.0])
    c = np.array([(side - 1) / 2, (side - 1) / 2])
    t = c + rng.uniform(-0.06, 0.06, 2) * side - lin @ c
    return np.hstack([lin, t[:, None]]).astype(np.float32)


def _window(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Clip the top of the range (a display window saturating bone and soft tissue), sometimes the bottom."""
    hi = float(np.percentile(img, rng.uniform(80, 99.5)))
    lo = float(np.percentile(img, rng.uniform(0, 15))) if rng.random() < 0.3 else float(img.min())
    if hi - lo < 8:
        return img
    f = (np.clip(img.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
    return (f + 0.5).astype(np.uint8)


def make_lung_example(gray: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None,
                      size: int = LUNG_INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(gray uint8, lung mask {0,1}) at native size -> (float32 size x size input, float32 size x size target).

    rng=None: no augmentation, the input is exactly `prepare_lung_input(gray)` (the serving input).
    """
    g, _ = letterbox(gray)
    m, _ = letterbox(mask.astype(np.uint8))
    m = m.astype(np.float32)
    if rng is not None:
        side = g.shape[0]
        M = _affine(side, rng)
        g = cv2.warpAffine(g, M, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=int(g.min()))
        m = cv2.warpAffine(m, M, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        if rng.random() < 0.4:
            g = _window(g, rng)
        g = _appearance(g, rng)
    clip = CLAHE_CLIP if rng is None or rng.random() < 0.6 else rng.uniform(2.0, 8.0)
    x = normalize_appearance(resize_to_input(g, size), clip).astype(np.float32) / np.float32(255.0)
    y = (resize_to_input(m, size) > 0.5).astype(np.float32)
    return x, y


# ---------------------------------------------------------------------------------------------------- training


def lr_at(step: int, total: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _load(samples) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(data.read_gray(s.image), data.read_mask(s.lung_mask)) for s in samples]


def heldout_dice(lung_model: LungModel, val, val_data) -> dict:
    """Held-out lung Dice (post-processed masks at each slice's size): per group and overall mean/global/min."""
    from shared.core.lung import lung_mask_from_probability

    probs = lung_model.predict([g for g, _ in val_data], batch_size=32)
    rows: dict[str, list] = {}
    for s, (_, gt), p in zip(val, val_data, probs):
        pred, gt = lung_mask_from_probability(p), gt > 0
        inter, tot = int((pred & gt).sum()), int(pred.sum() + gt.sum())
        rows.setdefault(s.group, []).append((1.0 if tot == 0 else 2 * inter / tot, inter, tot))

    def summary(items):
        d = np.array([r[0] for r in items])
        inter, tot = sum(r[1] for r in items), sum(r[2] for r in items)
        return {"images": len(items), "dice_mean": float(d.mean()), "dice_global": 2 * inter / tot if tot else 1.0,
                "dice_min": float(d.min())}

    out = {g: summary(v) for g, v in sorted(rows.items())}
    out["ALL"] = summary([r for v in rows.values() for r in v])
    return out


def train(args) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(args.seed)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)

    train_s, val_s, _ = data.split(args.covid_root)
    train_s = [s for s in train_s if s.lung_mask is not None]
    val_s = [s for s in val_s if s.lung_mask is not None]
    if not train_s:
        raise SystemExit(f"error: no training slices with lung masks under {args.covid_root}")
    print(f"{len(train_s)} training slices ({len({s.group for s in train_s})} groups), "
          f"{len(val_s)} held-out slices", file=sys.stderr)
    train_data, val_data = _load(train_s), _load(val_s)

    model = build_lung_unet(LUNG_INPUT_SIZE)
    opt = tf.keras.optimizers.Adam(args.lr)
    epoch_var = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt, epoch=epoch_var)
    manager = tf.train.CheckpointManager(ckpt, str(run / "checkpoint"), max_to_keep=1)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        print(f"resumed from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy())})", file=sys.stderr)
    start = int(epoch_var.numpy())
    total_steps = args.epochs * args.steps_per_epoch

    @tf.function
    def step(x, y, lr):
        opt.learning_rate.assign(lr)
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            bce = tf.reduce_mean(tf.keras.losses.binary_crossentropy(y, p))
            inter = tf.reduce_sum(p * y, axis=[1, 2, 3])
            dice = (2 * inter + 1.0) / (tf.reduce_sum(p + y, axis=[1, 2, 3]) + 1.0)
            loss = bce + 1.0 - tf.reduce_mean(dice)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss, tf.reduce_mean(dice)

    log_path = run / "log.csv"
    fields = ["epoch", "lr", "loss", "train_soft_dice", "heldout_dice_mean", "heldout_dice_global", "seconds"]
    if start == 0 or not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
    wrapper = LungModel(model, LUNG_INPUT_SIZE)
    t_run = time.perf_counter()
    for epoch in range(start, args.epochs):
        rng = np.random.default_rng([args.seed, epoch])   # per-epoch stream: a resumed run sees the same data
        t0 = time.perf_counter()
        losses, dices = [], []
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                   file=sys.stderr, disable=args.no_progress)
        for i in bar:
            idx = rng.integers(len(train_data), size=args.batch_size)
            ex = [make_lung_example(*train_data[j], None if args.no_augment else rng) for j in idx]
            x = np.stack([e[0] for e in ex])[..., None]
            y = np.stack([e[1] for e in ex])[..., None]
            lr = lr_at(epoch * args.steps_per_epoch + i, total_steps, args)
            loss, dice = step(x, y, tf.constant(lr, tf.float32))
            losses.append(float(loss))
            dices.append(float(dice))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", dice=f"{np.mean(dices[-20:]):.3f}")
        bar.close()
        ho = heldout_dice(wrapper, val_s, val_data)["ALL"]
        epoch_var.assign(epoch + 1)
        manager.save()
        row = {"epoch": epoch + 1, "lr": f"{lr:.3g}", "loss": f"{np.mean(losses):.4f}",
               "train_soft_dice": f"{np.mean(dices):.4f}", "heldout_dice_mean": f"{ho['dice_mean']:.4f}",
               "heldout_dice_global": f"{ho['dice_global']:.4f}", "seconds": f"{time.perf_counter() - t0:.1f}"}
        with open(log_path, "a", newline="") as f:
            csv.DictWriter(f, fields).writerow(row)
        print(f"epoch {epoch + 1}: loss {row['loss']} held-out Dice mean {row['heldout_dice_mean']} "
              f"global {row['heldout_dice_global']} ({row['seconds']} s)", file=sys.stderr)
    wall = time.perf_counter() - t_run

    # Publish the final epoch; evaluate the float16 file exactly as it ships.
    out = run / "lung.h5"
    model_lib.save_weights(model, out, metadata={"name": "covidseg-lung-unet-small", "input_size": LUNG_INPUT_SIZE})
    shipped = LungModel.load(out)
    metrics = heldout_dice(shipped, val_s, val_data)
    with open(log_path, newline="") as f:
        log = list(csv.DictReader(f))
    card = model_card(args, train_s, val_s, metrics, log, wall, out)
    (run / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    if args.publish:
        dest = Path(args.publish)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest)
        card["weights_file"] = dest.name
        dest.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
        print(f"published {dest} ({dest.stat().st_size / 1e6:.2f} MB) + {dest.with_suffix('.json').name}",
              file=sys.stderr)
    return card


def model_card(args, train_s, val_s, metrics, log, wall, weights_path) -> dict:
    """The JSON model card: data, split, preprocessing, training, held-out metrics."""
    return {
        "name": "covidseg-lung-unet-small",
        "task": "lung mask (both lungs, lesions included, experts' convention) on 8-bit axial CT slices; the "
                "denominator of percent of lung involved",
        "architecture": f"plain U-Net (shared.core.lung_model.build_lung_unet): filters {list(LUNG_FILTERS)}, "
                        f"bottleneck {2 * LUNG_FILTERS[-1]}, 2x(3x3 conv + BN + ReLU) per level, transposed-conv "
                        f"upsampling, sigmoid; input {LUNG_INPUT_SIZE}x{LUNG_INPUT_SIZE}x1",
        "weights_file": Path(weights_path).name,
        "weights_format": "HDF5, one float16 dataset per weight in model order (shared.core.model.save_weights)",
        "licence": "Non-commercial research use only (trained on CC BY-NC-SA data). Not a medical device.",
        "data": {"covid19-ct-seg-256": "COVID-19-CT-Seg (Ma Jun et al. 2020, Zenodo 10.5281/zenodo.3757476), "
                                       "expert lung masks (lung-masks/), as prepared by "
                                       "dstaroff/COVID19-CT-Segmentation"},
        "split": {"heldout_patient_groups": list(data.COVID_VAL_GROUPS),
                  "split_by": "inferred_patient_group (training.data.split), never by slice",
                  "n_train_slices": len(train_s), "n_train_groups": len({s.group for s in train_s}),
                  "n_heldout_slices": len(val_s),
                  "selection": "none: the final epoch is published; held-out Dice is logged, not used to choose"},
        "preprocessing": "shared.core.lung_model.prepare_lung_input: gray -> pad to square with the image minimum -> "
                         f"shared.core.preprocessing.preprocess(size={LUNG_INPUT_SIZE}) (resize, per-image min-max, "
                         "CLAHE clip 4, 8x8, /255); output probability resized back, un-padded, threshold 0.5, "
                         "specks < 0.05 % of the slice dropped, enclosed holes filled "
                         "(shared.core.lung.lung_mask_from_probability)",
        "training": {
            "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "batch_size": args.batch_size,
            "examples_seen": args.epochs * args.steps_per_epoch * args.batch_size,
            "lr": args.lr, "min_lr": args.min_lr, "warmup_steps": args.warmup_steps, "seed": args.seed,
            "augment": not args.no_augment,
            "augmentation": "training/train_lung.py make_lung_example: flips (LR, UD), rotation +-12 deg, scale "
                            "+-15 %, shift +-6 %, display-window jitter, gamma/contrast/blur/noise/JPEG, CLAHE "
                            "clip jitter",
            "loss": "binary cross-entropy + (1 - soft Dice per image)",
            "optimizer": "Adam, linear warm-up then cosine decay",
            "wall_time_minutes": round(wall / 60, 1),
            "hardware": f"{platform.processor() or platform.machine()}, CPU only, {args.threads} threads, "
                        "shared with another training run (nice 10)",
            "log": log,
        },
        "evaluation_protocol": "float16 weights file as shipped; masks at each slice's own size (256x256) vs the "
                               "expert lung masks; dice_mean = mean of per-image Dice, dice_global = pooled pixels",
        "heldout_metrics": metrics,
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train_lung", description=__doc__.splitlines()[0])
    p.add_argument("--covid-root", required=True, help="covid19-ct-seg-256 folder (images/, lung-masks/, ...)")
    p.add_argument("--run-dir", required=True, help="log.csv, checkpoint/, lung.h5, card.json (resumed if present)")
    p.add_argument("--publish", help="copy the final weights here and write the model card next to it (.json)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--min-lr", type=float, default=DEFAULTS["min_lr"])
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (default 2)")
    p.add_argument("--no-augment", action="store_true", help="disable augmentation (debugging)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not (Path(args.covid_root) / "slice_to_volume.csv").is_file():
        print(f"error: {args.covid_root} is not a covid19-ct-seg-256 folder (no slice_to_volume.csv)",
              file=sys.stderr)
        return 2
    card = train(args)
    m = card["heldout_metrics"]
    print("held-out lung Dice: " + ", ".join(f"{g} mean {r['dice_mean']:.4f} global {r['dice_global']:.4f} "
                                              f"min {r['dice_min']:.3f}" for g, r in m.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
