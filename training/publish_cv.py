"""Ship a cross-validated recipe's final model: weights/ + a model card that keeps CV and final numbers apart.

    python -m training.cv publish --recipe light22-bf16 --record docs/cv --run-root runs/cv \
        --covid-root ../shared/data/covid19-ct-seg-256 --medseg-root ../shared/data/medseg-100-train

Needs every fold of the recipe in the record (`training.cv evaluate --record`) and its finished final run
(`training.cv train --fold all`). The rule (docs/MODEL.md, fixed before the folds ran): the recipe's CV mean
per-image Dice must reach the shipped weights' own figures on both sets (their card's cross-validated means; for
a card from before cross-validation, the CV means of the recipe that made them, `shipped-cv`, once all its folds
are recorded, else the card's held-out means), and the final model's INT8 must stay within 0.01
mean Dice of its fp32. The final model has no held-out data: its own scores in the card are on training slices
(a sanity check, labelled so), and the generalisation estimate is the CV one.
"""
from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from pathlib import Path

from shared.core import model as model_lib
from training import data

#: the INT8 model may lose at most this much mean Dice against fp32 (the `auto` backend's own rule)
MAX_INT8_DROP = 0.01
#: every Nth covid slice of the training data for the final model's fp32/INT8 check (all MedSeg images)
CHECK_COVID_STRIDE = 4


#: the recipe that made weights whose card predates cross-validation. Their held-out figures are optimistic (the
#: epoch was picked on part of that hold-out, on other patients than the folds), so once this recipe has every
#: fold in the record, a new recipe is measured against it under the same protocol (rule revised 2026-12-04,
#: before any of its folds finished: docs/MODEL.md).
SHIPPED_RECIPE = "shipped-cv"


def shipped_bar(card: dict, record_results: dict | None = None, k: int = 3) -> dict[str, float]:
    """{"covid": x, "medseg": y}: what a new recipe's CV means must reach to replace these weights: their card's
    cross-validated means; for a card from before cross-validation, the CV means of the recipe that made them
    (`SHIPPED_RECIPE` in `record_results`, the output of `training.cv.collect`) once all k folds are in, else
    the card's held-out means."""
    cv = card.get("cross_validation")
    if cv:
        return {"covid": cv["covid"]["mean"], "medseg": cv["medseg"]["mean"]}
    own = (record_results or {}).get(SHIPPED_RECIPE)
    if own and len(own["folds"]) >= k:
        return {"covid": own["covid"][0], "medseg": own["medseg"][0]}
    held = card.get("validation_metrics", {})
    covid = next((v["mean_dice"] for k, v in held.items() if k.startswith("covid")), 0.0)
    medseg = next((v["mean_dice"] for k, v in held.items() if k.startswith("medseg")), 0.0)
    return {"covid": covid, "medseg": medseg}


def cv_summary(recipe: str, results: dict, k: int) -> dict:
    """The card's cross_validation block from `training.cv.collect(record)[recipe]`."""
    per_fold = {f: {"covid": m["covid"], "medseg": m["medseg"], "epoch": m["epoch"], "train_hours": m["train_hours"]}
                for f, m in results["folds"].items()}
    return {"recipe": recipe, "k": k, "folds_file": "training/folds.json",
            "protocol": "each fold trained on the other folds, scored at its LAST epoch on all its held-out slices "
                        "(fp32, threshold 0.5, Dice at each mask's own size); no epoch chosen by validation",
            "covid": {"mean": results["covid"][0], "sd": results["covid"][1]},
            "medseg": {"mean": results["medseg"][0], "sd": results["medseg"][1]},
            "cpu_hours": results["hours"], "per_fold": per_fold}


def publish(recipe: str, record, run_root, covid_root, medseg_root, force: bool = False,
            weights_path: Path | None = None) -> int:
    from shared.core.inference import Segmenter, inspect_weights
    from training import cv
    from training.publish import evaluate_samples

    weights_path = Path(weights_path or model_lib.DEFAULT_WEIGHTS)
    card_path = weights_path.with_suffix(".json")
    k = len(data.load_folds())
    recorded = cv.collect(record) if Path(record).is_dir() else {}
    results = recorded.get(recipe)
    if not results or len(results["folds"]) < k:
        done = len(results["folds"]) if results else 0
        print(f"error: {recipe}: {done} of {k} folds in {record}; cross-validate every fold first", file=sys.stderr)
        return 2
    final = cv.fold_dir(run_root, recipe, "all")
    state = json.loads((final / "state.json").read_text()) if (final / "state.json").is_file() else None
    if not state or state["epoch"] < state["args"]["epochs"]:
        print(f"error: the final run {final} is not finished", file=sys.stderr)
        return 2
    summary = cv_summary(recipe, results, k)
    old = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if recipe == SHIPPED_RECIPE and not old.get("cross_validation") and not force:
        print(f"not published: {recipe} is the shipped weights' own recipe, whose CV is the bar itself")
        return 1
    bar = shipped_bar(old, recorded, k)
    print(f"{recipe} CV: covid {summary['covid']['mean']:.4f} ± {summary['covid']['sd']:.4f}, "
          f"MedSeg {summary['medseg']['mean']:.4f} ± {summary['medseg']['sd']:.4f}; "
          f"shipped: covid {bar['covid']:.4f}, MedSeg {bar['medseg']:.4f}")
    beats = summary["covid"]["mean"] >= bar["covid"] and summary["medseg"]["mean"] >= bar["medseg"]
    if not beats and not force:
        print("not published: the recipe does not reach the shipped weights on both sets")
        return 1
    cand = final / "last.h5"
    framing = inspect_weights(cand)["metadata"].get("framing", "full")
    train, _, _ = data.split(covid_root, medseg_root, fold="all")
    check = {"covid19-ct-seg-256 (training slices, every %dth)" % CHECK_COVID_STRIDE:
             [s for s in train if s.domain != "medseg"][::CHECK_COVID_STRIDE],
             "medseg-100-train (training images)": [s for s in train if s.domain == "medseg"]}
    fp32 = Segmenter(weights=cand, backend="fp32")
    int8 = Segmenter(weights=cand, backend="int8")
    if int8.backend != "int8":
        print("error: the INT8 model could not be built", file=sys.stderr)
        return 2
    seen = {name: {"fp32": evaluate_samples(fp32.predict_model_input, s, desc=f"fp32 {name[:12]}", framing=framing),
                   "int8": evaluate_samples(int8.predict_model_input, s, desc=f"int8 {name[:12]}", framing=framing)}
            for name, s in check.items()}
    drops = {n: v["fp32"]["mean_dice"] - v["int8"]["mean_dice"] for n, v in seen.items()}
    for n, v in seen.items():
        print(f"final model on {n}: fp32 {v['fp32']['mean_dice']:.4f}, int8 {v['int8']['mean_dice']:.4f}")
    if max(drops.values()) > MAX_INT8_DROP and not force:
        print(f"not published: INT8 loses more than {MAX_INT8_DROP} mean Dice against fp32")
        return 1
    from training.publish import _hyperparameters, card_basics

    card = {
        "name": weights_path.stem,
        **card_basics(weights_path),
        "split": {"final_model": f"every slice ({len(train)}): all patient groups and all 50 MedSeg images",
                  "cross_validation": "training/folds.json (patient groups; MedSeg blocks of 5 neighbouring images)"},
        "framing": framing,
        "preprocessing": "shared.core.framing (framing above) then shared.core.preprocessing.preprocess: grayscale "
                         "-> resize to 448 (INTER_AREA down, INTER_CUBIC up) -> per-image min-max -> uint8 -> "
                         "CLAHE(clip 4, 8x8) -> /255",
        "cross_validation": summary,
        "final_model": {
            "epochs": state["epoch"], "published_epoch": state["epoch"],
            "schedule": "fixed in advance (training.cv.RECIPES); the last epoch is shipped, nothing chosen on a "
                        "validation score",
            "wall_time_hours": round(state["train_seconds"] / 3600, 2),
            "hyperparameters": _hyperparameters(state["args"]),
            "log": list(csv.DictReader(open(final / "log.csv"))),
            "scores_on_training_slices": seen,
            "scores_on_training_slices_note": "the final model has seen these slices: a check that fp32 and "
                                              "INT8 agree, not an estimate of accuracy on new patients",
        },
        "loss": "binary cross-entropy + per-image Jaccard (segmentation_models)",
        "optimizer": "Adam, linear warm-up then cosine decay",
        "evaluation_protocol": "full 448 canvas of the frame, threshold 0.5, prediction pasted back and scored at "
                               "each mask's size, mask pixel > 0 positive; mean_* are means of per-image scores",
        "replaced": {"selection_rule": "CV means >= the bar on both sets: the replaced weights' CV means, else those of "
                                       "the recipe that made them (shipped-cv), else their held-out means", "bar": bar,
                     "replaced_card_published": old.get("published")},
        "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = weights_path.with_suffix(".h5.tmp")
    shutil.copyfile(cand, tmp)
    tmp.replace(weights_path)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"published {weights_path} and {card_path}")
    return 0
