"""Publish a training run's best weights to weights/ with a JSON model card, only if they beat what is shipped.

    python -m training.publish --run-dir /work/runs/r1 --covid-root ../shared/data/covid19-ct-seg-256 \
        --medseg-root ../shared/data/medseg-100-train

Evaluates the candidate on the FULL held-out sets (fp32, 448 canvas, threshold 0.5, Dice at each mask's own
size: the same protocol as `covidseg evaluate`), compares with the card of the shipped weights and, if the
candidate is better (mean of the two held-out mean Dice scores), writes weights/covidseg-unet-resnet34.h5
(float16) and weights/covidseg-unet-resnet34.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from shared.core import model as model_lib
from training import data
from training.augment import make_example

CARD_PATH = model_lib.DEFAULT_WEIGHTS.with_suffix(".json")


def native_probabilities(predict, samples, batch_size=8, desc="evaluate", framing: str = "full"):
    """Yield (sample, mask, probability) per sample, the probability at the mask's own size.

    `predict`: (N, 448, 448, 1) preprocessed batch -> (N, 448, 448) probabilities. `framing`: the weights' own
    (`shared.core.framing`): each slice's frame goes in, the map is pasted back into the whole slice."""
    from tqdm import tqdm

    from shared.core.framing import frame_slices

    for i in tqdm(range(0, len(samples), batch_size), desc=desc, mininterval=5, file=sys.stdout):
        chunk = samples[i:i + batch_size]
        imgs = [data.read_gray(s.image) for s in chunk]
        masks = [data.read_mask(s.mask) for s in chunk]
        frames = frame_slices(imgs, framing)
        x = np.stack([make_example(f.crop(im), f.crop(m), None)[0] for im, m, f in zip(imgs, masks, frames)])[..., None]
        probs = np.asarray(predict(x), dtype=np.float32)
        for s, m, p, f in zip(chunk, masks, probs, frames):
            yield s, m, f.paste(p)


def evaluate_samples(predict, samples, batch_size=8, desc="evaluate", framing: str = "full") -> dict:
    """Mean/global Dice and IoU, sensitivity, specificity over `samples` (threshold 0.5, native mask size), the
    reductions of `shared.core.metrics.aggregate`, plus `per_group` when the samples share patient groups and
    `per_infection_size` (the same by `shared.core.metrics.infection_size_groups` bin).

    `predict`: (N, 448, 448, 1) preprocessed batch -> (N, 448, 448) probabilities."""
    from shared.core.metrics import SUMMARY_KEYS, aggregate, aggregate_groups, image_scores, infection_size_groups

    per = [image_scores(s.image.name, p >= 0.5, m > 0)
           for s, m, p in native_probabilities(predict, samples, batch_size, desc, framing)]
    out = {k: aggregate(per)[k] for k in SUMMARY_KEYS}
    group_of = {s.image.name: s.group for s in samples}
    if len(set(group_of.values())) < len(group_of):  # MedSeg: one image per group, nothing to add
        out["per_group"] = aggregate_groups(per, group_of)
    out["per_infection_size"] = aggregate_groups(per, infection_size_groups(per))
    return out


def card_basics(weights_path: Path) -> dict:
    """The model card entries every published U-Net shares: architecture, file, format, licence, data."""
    return {
        "architecture": "segmentation_models Unet('resnet34', encoder_weights=None, classes=1, "
                        "activation='sigmoid'), input 448x448x1 (fully convolutional)",
        "weights_file": Path(weights_path).name,
        "weights_format": "HDF5, one float16 dataset per weight in model order (shared.core.model.save_weights)",
        "licence": "Non-commercial research use only (trained on CC BY-NC-SA / non-commercial data). "
                   "Not a medical device.",
        "data": {
            "covid19-ct-seg-256": "COVID-19-CT-Seg (Ma Jun et al. 2020, Zenodo 10.5281/zenodo.3757476), 1,614 "
                                  "slices of 20 volumes as prepared by dstaroff/COVID19-CT-Segmentation",
            "medseg-100-train": "MedSeg COVID-19 CT segmentation dataset as repackaged by Inf-Net (50 slices)",
        },
    }


def _hyperparameters(run_args: dict) -> dict:
    """A run's saved arguments without the machine-specific paths."""
    return {k: v for k, v in run_args.items() if k not in ("covid_root", "medseg_root", "run_dir", "images", "masks")}


def _weights_metadata(path) -> dict:
    from shared.core.inference import inspect_weights

    return inspect_weights(path)["metadata"]


def parent_summary(parent_run: Path, init_weights: str | None) -> dict:
    """What a fine-tuning run started from: the parent run's hyper-parameters and its log up to the epoch of
    the initial weights (from their metadata), with that part's wall time."""
    state = json.loads((parent_run / "state.json").read_text())
    log = list(csv.DictReader(open(parent_run / "log.csv")))
    epoch = _weights_metadata(init_weights).get("epoch") if init_weights and Path(init_weights).is_file() else None
    used = [r for r in log if epoch is None or int(r["epoch"]) <= int(epoch)]
    return {"run": parent_run.name, "init_weights": init_weights, "init_epoch": epoch,
            "epochs_used": len(used),
            "wall_time_hours": round(sum(float(r["seconds"]) for r in used) / 3600, 2),
            "hyperparameters": _hyperparameters(state["args"]), "log": used}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.publish", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--checkpoint", default="best.h5", help="file in the run dir to publish (default best.h5)")
    p.add_argument("--covid-root", required=True)
    p.add_argument("--medseg-root", required=True)
    p.add_argument("--force", action="store_true", help="publish even if not better than the shipped card")
    p.add_argument("--parent-run", help="for a run started with --init-weights: the run those weights came from "
                   "(its hyper-parameters, log and wall time go into the card)")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    cand = run / args.checkpoint
    if not cand.is_file():
        print(f"error: {cand} does not exist", file=sys.stderr)
        return 2
    if args.parent_run and not (Path(args.parent_run) / "state.json").is_file():
        print(f"error: --parent-run {args.parent_run}: no state.json (not a training run folder)", file=sys.stderr)
        return 2
    _, val_c, val_m = data.split(args.covid_root, args.medseg_root)
    net = model_lib.load_model(cand)
    t0 = time.time()
    fp32 = lambda x: net.predict_on_batch(x)[..., 0]  # noqa: E731
    framing = _weights_metadata(cand).get("framing", "full")
    metrics = {"covid19-ct-seg-256 held-out groups": evaluate_samples(fp32, val_c, framing=framing),
               "medseg-100-train held-out images": evaluate_samples(fp32, val_m, framing=framing)}
    score = float(np.mean([m["mean_dice"] for m in metrics.values()]))
    for name, m in metrics.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()
                                      if k != "per_group"))
        for g, gm in m.get("per_group", {}).items():
            print(f"  {g}: n {gm['n_images']}, mean_dice {gm['mean_dice']:.4f}, sensitivity {gm['sensitivity']:.4f}")
    old = json.loads(CARD_PATH.read_text()) if CARD_PATH.exists() else {}
    old_score = old.get("selection_score", -1.0)
    print(f"candidate score {score:.4f} vs shipped {old_score:.4f} (eval {time.time() - t0:.0f} s)")
    if score <= old_score and not args.force:
        print("not published: the shipped weights are at least as good")
        return 1
    # the CPU default backend on the same held-out sets: its Dice must stay within 0.01 of fp32's
    from shared.core.inference import Segmenter

    int8 = Segmenter(weights=cand, backend="int8")
    int8_metrics = {name: evaluate_samples(int8.predict_model_input, samples, desc="evaluate int8", framing=framing)
                    for name, samples in (("covid19-ct-seg-256 held-out groups", val_c),
                                          ("medseg-100-train held-out images", val_m))} \
        if int8.backend == "int8" else {"error": "the INT8 backend could not be built"}
    for name, m in int8_metrics.items():
        if isinstance(m, dict):
            print(f"int8 {name}: mean_dice {m['mean_dice']:.4f} (fp32 {metrics[name]['mean_dice']:.4f})")
    state = json.loads((run / "state.json").read_text())
    log = list(csv.DictReader(open(run / "log.csv")))
    meta = _weights_metadata(cand)
    parent = parent_summary(Path(args.parent_run), state["args"].get("init_weights")) if args.parent_run else None
    augment_profile = state["args"].get("augment", "full")
    card = {
        "name": "covidseg-unet-resnet34",
        **card_basics(model_lib.DEFAULT_WEIGHTS),
        "split": {
            "covid_val_patient_groups": list(data.COVID_VAL_GROUPS),
            "covid_split_by": "inferred_patient_group (never by slice)",
            "medseg_val_images": data.medseg_val_stems(args.medseg_root),
            "medseg_split": f"random.Random({data.MEDSEG_SPLIT_SEED}).sample of {data.MEDSEG_VAL_COUNT} stems",
            "n_train_slices": len(data.split(args.covid_root, args.medseg_root)[0]),
        },
        "framing": framing,
        "preprocessing": "shared.core.preprocessing.preprocess: grayscale -> resize to 448 (INTER_AREA down, "
                         "INTER_CUBIC up) -> per-image min-max -> uint8 -> CLAHE(clip 4, 8x8) -> /255",
        **({"output_calibration": meta["output_calibration"]} if meta.get("output_calibration") else {}),
        "training": {
            "epochs_completed": state["epoch"], "published_epoch": meta.get("epoch"),
            **({"averaged_epochs": meta["averaged_epochs"], "batchnorm_after_averaging": meta.get("batchnorm")}
               if meta.get("averaged_epochs") else {}),
            "wall_time_hours": round(state["train_seconds"] / 3600, 2),
            **({"initialised_from": parent,
                "total_wall_time_hours": round(state["train_seconds"] / 3600 + parent["wall_time_hours"], 2)}
               if parent else {}),
            "hardware": "2 CPU cores (Intel Xeon, AVX-512, no GPU)",
            "hyperparameters": _hyperparameters(state["args"]),
            "loss": "binary cross-entropy + per-image Jaccard (segmentation_models)",
            "optimizer": "Adam, linear warm-up then cosine decay",
            "augmentation": "training/augment.py: affine on the 448 canvas (domain-specific zoom, rotation, "
                            "flip, shift, MedSeg 90-degree turns), gamma/contrast/blur/noise/JPEG, CLAHE clip "
                            f"jitter, lesion-biased crops; profile '{augment_profile}' (training.augment.PROFILES)",
            "log": log,
        },
        "evaluation_protocol": "fp32, full 448 canvas, threshold 0.5, prediction resized to each mask's size, "
                               "mask pixel > 0 positive; mean_* are means of per-image scores",
        "validation_metrics": metrics,
        "validation_metrics_int8": int8_metrics,
        "int8_protocol": "the same held-out sets through the INT8 onnxruntime model (shared.core.inference, "
                         "backend int8: the CPU default when within 0.01 mean Dice of fp32)",
        "selection_score": score,
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = model_lib.DEFAULT_WEIGHTS.with_suffix(".h5.tmp")
    shutil.copyfile(cand, tmp)
    tmp.replace(model_lib.DEFAULT_WEIGHTS)
    CARD_PATH.write_text(json.dumps(card, indent=2) + "\n")
    curves = model_lib.REPO_ROOT / "docs" / "training_curves.png"
    if parent:
        # the whole history: the parent run up to the initial weights, then this run, epochs continued
        from training.train import plot_curves

        offset = parent["epochs_used"]
        rows = parent["log"] + [{**r, "epoch": str(int(r["epoch"]) + offset)} for r in log]
        plot_curves(rows, curves, marks={offset + 0.5: f"{run.name}: fine-tuning, "
                                                        f"augment {augment_profile}"})
    else:
        shutil.copyfile(run / "curves.png", curves)
    print(f"published {model_lib.DEFAULT_WEIGHTS} and {CARD_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
