"""training.publish: per-group metrics of the held-out sets and the lineage of a fine-tuned run in the card."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from training import data
from training.publish import evaluate_samples, main, parent_summary

FX = Path(__file__).resolve().parents[1] / "fixtures"


def _samples(groups):
    return [data.Sample(FX / "slices" / f"{n}.png", FX / "masks" / f"{n}.png", "covid", g)
            for n, g in zip(("covid_0300", "covid_0340", "covid_1000"), groups)]


def test_evaluate_samples_per_group():
    ones = lambda x: np.ones(x.shape[:3], np.float32)  # noqa: E731
    m = evaluate_samples(ones, _samples(["p1", "p1", "p2"]))
    masks = [cv2.imread(str(FX / "masks" / f"{n}.png"), cv2.IMREAD_GRAYSCALE) > 0
             for n in ("covid_0300", "covid_0340", "covid_1000")]
    dice = [2 * k.sum() / (k.sum() + k.size) for k in masks]
    assert list(m["per_group"]) == ["p1", "p2"]
    assert m["per_group"]["p1"]["n_images"] == 2
    assert m["per_group"]["p1"]["mean_dice"] == pytest.approx(np.mean(dice[:2]), abs=1e-12)
    assert m["per_group"]["p2"]["mean_dice"] == pytest.approx(dice[2], abs=1e-12)
    assert m["mean_dice"] == pytest.approx(np.mean(dice), abs=1e-12)
    # infection size bins from the masks' own infected share
    share = [k.mean() for k in masks]
    expect = {}
    for d, sh in zip(dice, share):
        label = "1: < 0.75 %" if sh < 0.0075 else "2: 0.75–7.5 %" if sh < 0.075 else "3: ≥ 7.5 %"
        expect.setdefault(label, []).append(d)
    assert {b: v["n_images"] for b, v in m["per_infection_size"].items()} == {b: len(v) for b, v in expect.items()}
    for b, v in expect.items():
        assert m["per_infection_size"][b]["mean_dice"] == pytest.approx(np.mean(v), abs=1e-12)
    # one image per group (MedSeg): no per-group section
    assert "per_group" not in evaluate_samples(ones, _samples(["a", "b", "c"]))


def _run_dir(path: Path, epochs: int, seconds: float) -> Path:
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"epoch": epochs, "train_seconds": epochs * seconds,
                                                 "args": {"lr": 1e-3, "run_dir": str(path), "crop": 224}}))
    rows = ["epoch,lr,loss,train_iou,val_dice_covid,val_dice_medseg,score,seconds"]
    rows += [f"{e},0.001,0.5,0.5,0.6,0.6,0.6,{seconds}" for e in range(1, epochs + 1)]
    (path / "log.csv").write_text("\n".join(rows) + "\n")
    return path


def test_parent_summary_counts_the_parent_up_to_the_initial_weights(tmp_path):
    parent = _run_dir(tmp_path / "r1", epochs=5, seconds=720.0)
    init = tmp_path / "r1" / "e3.h5"
    with h5py.File(init, "w") as f:  # the layout of shared.core.model.save_weights, without the tensors
        f.attrs["covidseg_weights_format"] = 1
        f.attrs["metadata"] = json.dumps({"epoch": 3})
    s = parent_summary(parent, str(init))
    assert (s["run"], s["init_epoch"], s["epochs_used"]) == ("r1", 3, 3)
    assert s["wall_time_hours"] == pytest.approx(3 * 720 / 3600)
    assert [r["epoch"] for r in s["log"]] == ["1", "2", "3"]
    assert s["hyperparameters"] == {"lr": 1e-3, "crop": 224}  # paths dropped
    # initial weights without an epoch (or gone): the whole parent run
    assert parent_summary(parent, str(tmp_path / "gone.h5"))["epochs_used"] == 5


def test_publish_rejects_a_parent_that_is_not_a_run(tmp_path, capsys):
    run = _run_dir(tmp_path / "ft", epochs=1, seconds=10.0)
    (run / "best.h5").write_bytes(b"")
    rc = main(["--run-dir", str(run), "--covid-root", str(tmp_path), "--medseg-root", str(tmp_path),
               "--parent-run", str(tmp_path / "nope")])
    assert rc == 2 and "no state.json" in capsys.readouterr().err


def test_curves_of_parent_and_fine_tuning_in_one_plot(tmp_path):
    from training.train import plot_curves

    parent = _run_dir(tmp_path / "r1", epochs=4, seconds=1.0)
    rows = parent_summary(parent, None)["log"]
    rows += [{**r, "epoch": str(int(r["epoch"]) + 4)} for r in rows[:2]]
    out = tmp_path / "curves.png"
    plot_curves(rows, out, marks={4.5: "ft: fine-tuning, augment light"})
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > 800
