"""`covidseg train`: train the U-Net on the real data, with checkpoints, resume, CSV log and learning curves.

Choices (measured on 2 CPU cores, see README "Training"):
- Crops: examples are augmented on the 448x448 serving canvas (so the model sees anatomy at the scale it will
  be served at) and then cropped to 224x224 (lesion-biased). A 224 crop costs about 1/4 of a full 448 image; the
  U-Net is fully convolutional, so it is then applied to the whole 448 canvas at serving time.
- fp32 by default, bf16 where the CPU has AMX: on a 2-core Cascade Lake (AVX-512, no AVX512-BF16/AMX) bf16
  training measured 2.2x slower than fp32; on a 2-core Sapphire Rapids-class Xeon (AMX-BF16) 2.2x faster
  (0.52 vs 1.16 s per step of 8 crops of 224^2). The sigmoid output and the loss stay float32 either way.
- Loss: binary cross-entropy + Jaccard, Jaccard computed per image so that small lesions count as much as big
  ones (the product metric is mean per-image Dice). Adam with warm-up and cosine decay.
- Every epoch: validation on the held-out patient groups (full 448 canvas, threshold 0.5, Dice at each mask's own
  size), CSV log, learning-curve PNG, a resumable checkpoint (weights + optimizer + RNG/epoch state) and the best
  weights by validation score.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from shared.core import model as model_lib  # sets the TF/Keras environment first
from shared.core.preprocessing import INPUT_SIZE
from training import augment, data

DEFAULTS = dict(epochs=14, steps_per_epoch=150, batch_size=8, crop=224, lr=1e-3, min_lr=1e-5, warmup_epochs=1,
                medseg_fraction=0.2, seed=42, precision="fp32")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--covid-root", help="covid19-ct-seg-256 folder (images/, masks/, slice_to_volume.csv)")
    p.add_argument("--medseg-root", help="medseg-100-train folder (images/, masks/)")
    p.add_argument("--images", help="generic layout from `covidseg convert`: images folder (with --masks)")
    p.add_argument("--masks", help="masks folder paired by file stem with --images")
    p.add_argument("--run-dir", required=True, help="where checkpoints, log.csv, curves.png and best weights go; "
                   "an existing run is resumed")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="total epochs of the run (default 14)")
    p.add_argument("--steps-per-epoch", type=int, default=DEFAULTS["steps_per_epoch"], help="default 150")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default 8")
    p.add_argument("--crop", type=int, default=DEFAULTS["crop"], help="training crop side (default 224; "
                   "0 = whole 448 canvas)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak Adam learning rate (default 1e-3)")
    p.add_argument("--min-lr", type=float, default=DEFAULTS["min_lr"], help="final learning rate (default 1e-5)")
    p.add_argument("--warmup-epochs", type=int, default=DEFAULTS["warmup_epochs"], help="default 1")
    p.add_argument("--medseg-fraction", type=float, default=DEFAULTS["medseg_fraction"],
                   help="share of MedSeg examples in each batch (default 0.2)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="RNG seed (default 42)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=DEFAULTS["precision"],
                   help="training precision (default fp32; bf16 only pays on CPUs with AVX512-BF16/AMX or GPUs)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for TensorFlow's ops (default 0: TensorFlow decides, i.e. every core); 1 lets "
                   "two runs share a 2-core machine, which measured 1.4x the total throughput of one 2-thread run")
    p.add_argument("--init-weights", help="start from these weights (e.g. the shipped ones) instead of random")
    p.add_argument("--fold", type=_fold_arg, default=None,
                   help="train on the other folds of training/folds.json and validate on fold K (cross-validation); "
                   "'all' trains on every slice with no validation (a final model, fixed schedule: the last "
                   "epoch is the result). Default: the fixed hold-out of training.data.split")
    p.add_argument("--val-limit", type=int, default=0, help="validate on at most N slices per set (0 = all)")
    p.add_argument("--augment", choices=sorted(augment.PROFILES), default="full",
                   help="augmentation profile (default full: wide ranges that bridge the two domains; light: "
                   "narrower, for fine-tuning a run that is still under-fitted)")
    p.add_argument("--framing", choices=["full", "lung"], default="full",
                   help="what the model sees of each slice (shared.core.framing): full (default) or lung (the "
                   "learned lung mask's bounding box, as MedSeg slices already are); stored in the weights' "
                   "metadata, so serving frames the same way")
    p.add_argument("--lesion-sampling", choices=augment.LESION_SAMPLING, default="pixel",
                   help="which lesion a training crop is centred on (training.augment.random_crop): pixel "
                   "(default: a random lesion pixel, so mostly big lesions) or component (a random connected "
                   "lesion, so small foci as often as big ones)")
    p.add_argument("--no-augment", action="store_true", help="disable augmentation (debugging)")


def _fold_arg(value: str):
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be a whole number or 'all', not {value!r}") from None


def lr_at(epoch: int, args) -> float:
    """Linear warm-up then cosine decay to min_lr, as a function of the (0-based) epoch."""
    if epoch < args.warmup_epochs:
        return args.lr * (epoch + 1) / (args.warmup_epochs + 1)
    t = (epoch - args.warmup_epochs) / max(1, args.epochs - args.warmup_epochs)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def training_loss():
    """BCE + per-image Jaccard: the trainer's loss (and what `training.cv plan` times)."""
    import segmentation_models as sm

    return sm.losses.BinaryCELoss() + sm.losses.JaccardLoss(per_image=True)


def frame_examples(examples, framing: str = "full"):
    """[(image, mask, domain)] -> the same, each image and mask cut to the image's frame (`shared.core.framing`,
    the function serving uses)."""
    from shared.core.framing import frame_slices

    frames = frame_slices([img for img, _, _ in examples], framing)
    return [(f.crop(img), f.crop(mask), d) for (img, mask, d), f in zip(examples, frames)]


def _load(samples, framing: str = "full"):
    """[(image, mask, domain)] of the samples, framed."""
    return frame_examples([(data.read_gray(s.image), data.read_mask(s.mask), s.domain) for s in samples], framing)


def _generic_samples(images_dir, masks_dir):
    masks = {p.stem: p for p in Path(masks_dir).iterdir() if p.suffix.lower() in data.IMAGE_EXTENSIONS}
    out = []
    for p in sorted(Path(images_dir).iterdir()):
        if p.suffix.lower() in data.IMAGE_EXTENSIONS and p.stem in masks:
            out.append(data.Sample(p, masks[p.stem], "covid", p.stem.split("_")[0]))
    return out


def batches(train, args, rng):
    covid = [t for t in train if t[2] != "medseg"]
    medseg = [t for t in train if t[2] == "medseg"]
    crop = args.crop or INPUT_SIZE
    profile = augment.PROFILES[getattr(args, "augment", "full")]
    # framed by the lung box, MedSeg and covid slices are served at one scale: one zoom range for both
    zoom_domain = "covid" if getattr(args, "framing", "full") == "lung" else None
    while True:
        xs, ys = [], []
        for _ in range(args.batch_size):
            pool = medseg if (medseg and (not covid or rng.random() < args.medseg_fraction)) else covid
            img, mask, domain = pool[rng.integers(len(pool))]
            x, y = augment.make_example(img, mask, None if args.no_augment else rng, domain, profile=profile,
                                        zoom_domain=zoom_domain)
            x, y = augment.random_crop(x, y, crop, rng, lesion_sampling=getattr(args, "lesion_sampling", "pixel"))
            xs.append(x)
            ys.append(y)
        yield np.stack(xs)[..., None], np.stack(ys)[..., None]


def validate(model, val, batch_size=8):
    """Mean per-image Dice (threshold 0.5, at each mask's native size) over `val` [(img, mask, domain, frame)]:
    the framed image in, the probability pasted back into the whole slice, scored against the whole mask."""
    from shared.core.metrics import dice_iou_counts  # noqa: PLC0415

    dices = []
    for i in range(0, len(val), batch_size):
        chunk = val[i:i + batch_size]
        x = np.stack([augment.make_example(f.crop(img), f.crop(m), None)[0] for img, m, _, f in chunk])[..., None]
        probs = model.predict_on_batch(x)[..., 0].astype(np.float32)
        for (_, m, _, f), p in zip(chunk, probs):
            dices.append(dice_iou_counts(f.paste(p) >= 0.5, m > 0)[0])
    return float(np.mean(dices)) if dices else float("nan")


def plot_curves(log_path: Path | list[dict], out_png: Path, marks: dict[float, str] | None = None) -> None:
    """Loss and validation Dice per epoch from a log.csv (or its rows); `marks`: epoch -> label, drawn as
    vertical lines (e.g. where a fine-tuning run took over from its parent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log_path if isinstance(log_path, list) else list(csv.DictReader(open(log_path)))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [float(r["loss"]) for r in rows], label="train loss (BCE + per-image Jaccard)")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    for key, label in (("val_dice_covid", "held-out covid19-ct-seg (mean Dice)"),
                       ("val_dice_medseg", "held-out MedSeg (mean Dice)"), ("train_iou", "train IoU (crops)")):
        vals = [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
        if vals:
            b.plot(ep[:len(vals)], vals, marker="o", label=label)
    b.axhline(0.70, color="C0", ls=":", lw=1), b.axhline(0.65, color="C1", ls=":", lw=1)
    for x, label in (marks or {}).items():
        for ax in (a, b):
            ax.axvline(x, color="gray", ls="--", lw=1)
        b.text(x, 0.03, f" {label}", color="gray", fontsize=8, rotation=90, va="bottom")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run(args) -> int:
    import segmentation_models as sm
    import tensorflow as tf
    from tqdm import tqdm

    if getattr(args, "threads", 0):
        # only before TensorFlow's first op: the thread pools are fixed once the runtime starts
        try:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        except RuntimeError:
            print(f"warning: --threads {args.threads} ignored: TensorFlow is already running in this process",
                  file=sys.stderr)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state:
        # a resumed run keeps its data and hyper-parameters; only --epochs may grow it
        # runs saved before profiles used full; before folds, the fixed hold-out
        for k, v in {"augment": "full", "fold": None, "framing": "full", "lesion_sampling": "pixel",
                     **state["args"]}.items():
            if k not in ("epochs", "run_dir", "val_limit", "threads"):
                setattr(args, k, v)
    if args.images and args.masks:
        train = _generic_samples(args.images, args.masks)
        val_c, val_m = [], []
    else:
        try:
            train, val_c, val_m = data.split(args.covid_root, args.medseg_root, fold=getattr(args, "fold", None))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not train:
        print("error: no training samples: give --covid-root/--medseg-root or --images/--masks", file=sys.stderr)
        return 2
    print(f"train {len(train)} slices | val covid {len(val_c)} | val medseg {len(val_m)}", flush=True)
    tf.keras.utils.set_random_seed(args.seed)
    from shared.core.framing import frame_slices

    framing = getattr(args, "framing", "full")
    train_arr = _load(train, framing)
    # validation keeps the whole slice and its frame: Dice is scored on the whole mask, as serving is
    val_sets = {}
    for name, samples in (("covid", val_c), ("medseg", val_m)):
        loaded = [(data.read_gray(s.image), data.read_mask(s.mask), s.domain) for s in samples]
        frames = frame_slices([img for img, _, _ in loaded], framing)
        val_sets[name] = [(*t, f) for t, f in zip(loaded, frames)]
    if args.val_limit:
        # evenly spaced, so every held-out patient group stays represented
        val_sets = {k: [v[int(i)] for i in np.unique(np.linspace(0, len(v) - 1, min(len(v), args.val_limit)).round())]
                    for k, v in val_sets.items() if v} | {k: v for k, v in val_sets.items() if not v}

    model_lib.configure_devices()
    model = model_lib.build_unet(precision=args.precision)
    loss = training_loss()
    opt = tf.keras.optimizers.Adam(learning_rate=args.lr)
    model.compile(optimizer=opt, loss=loss, metrics=[sm.metrics.IOUScore(threshold=0.5, name="iou")])
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "ckpt"), max_to_keep=2)
    start_epoch = 0
    if state and manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        start_epoch = state["epoch"]
        print(f"resumed {run_dir} at epoch {start_epoch}", flush=True)
    elif args.init_weights:
        model_lib.load_weights(model, args.init_weights)
        print(f"initialised from {args.init_weights}", flush=True)
    rng = np.random.default_rng([args.seed, start_epoch])  # a resumed run continues with a fresh, fixed stream
    log_path = run_dir / "log.csv"
    fields = ["epoch", "lr", "loss", "train_iou", "val_dice_covid", "val_dice_medseg", "score", "seconds"]
    if not log_path.exists():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    best = state.get("best_score", -math.inf)  # scores can be < -1 (-loss when there is no validation set)
    t_run = state.get("train_seconds", 0.0)
    gen = batches(train_arr, args, rng)
    crop = args.crop or INPUT_SIZE
    ds = tf.data.Dataset.from_generator(
        lambda: gen, output_signature=(tf.TensorSpec((None, crop, crop, 1), tf.float32),
                                       tf.TensorSpec((None, crop, crop, 1), tf.float32))).prefetch(2)
    it = iter(ds)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        lr = lr_at(epoch, args)
        opt.learning_rate.assign(lr)
        losses, ious = [], []
        bar = tqdm(range(args.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=10,
                   file=sys.stdout)
        for _ in bar:
            x, y = next(it)
            out = model.train_on_batch(x, y, return_dict=True)
            losses.append(out["loss"]), ious.append(out["iou"])
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", iou=f"{np.mean(ious[-50:]):.3f}")
        dc = validate(model, val_sets["covid"]) if val_sets["covid"] else float("nan")
        dm = validate(model, val_sets["medseg"]) if val_sets["medseg"] else float("nan")
        scores = [d for d in (dc, dm) if not math.isnan(d)]
        score = float(np.mean(scores)) if scores else -float(np.mean(losses))
        dt = time.time() - t0
        t_run += dt
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow([epoch + 1, f"{lr:.6g}", f"{np.mean(losses):.5f}", f"{np.mean(ious):.4f}",
                                    f"{dc:.4f}", f"{dm:.4f}", f"{score:.4f}", f"{dt:.1f}"])
        meta = {"epoch": epoch + 1, "val_dice_covid": dc, "val_dice_medseg": dm, "score": score,
                "framing": framing}
        model_lib.save_weights(model, run_dir / "last.h5", metadata=meta)
        if score > best:
            best = score
            model_lib.save_weights(model, run_dir / "best.h5", metadata=meta)
        manager.save()
        state = {"epoch": epoch + 1, "best_score": best, "train_seconds": t_run,
                 "args": {k: v for k, v in vars(args).items() if not callable(v)}}
        state_path.write_text(json.dumps(state, indent=1))
        plot_curves(log_path, run_dir / "curves.png")
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} iou {np.mean(ious):.3f} | val Dice covid {dc:.4f} "
              f"medseg {dm:.4f} | {dt:.0f} s{' (best)' if score >= best else ''}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="covidseg train", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
