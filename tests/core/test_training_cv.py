"""training.data folds and training.cv: the committed folds, fold splits, recipe arguments, the results table and
one tiny fold trained and evaluated end to end on the committed fixture slices."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shared.core.inference import file_digest
from training import cv, data

FX = Path(__file__).resolve().parents[1] / "fixtures"

#: The 18 inferred patient groups of covid19-ct-seg-256 and the 50 MedSeg stems (../shared/data/README.md).
COVID_GROUPS = {f"coronacases_{n:03d}" for n in range(1, 11)} | {
    "radiopaedia_14_85914_0", "radiopaedia_27_86410_0", "radiopaedia_36_86526_0", "radiopaedia_40_86625_0",
    "radiopaedia_4_85506_1", "radiopaedia_7_85703_0", "radiopaedia_case10", "radiopaedia_case29"}
MEDSEG_STEMS = {str(s) for s in [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 23, 24, 25, 26, 27, 28, 29,
                                 30, 31, 32, 33, 34, 35, 37, 39, 40, 41, 42, 43, 44, 45, 46, 47, 49, 50, 51, 52, 53,
                                 54, 55, 56, 57, 58, 67]}


def test_committed_folds_partition_every_patient_group_and_image():
    folds = data.load_folds()
    assert len(folds) == 3
    groups = [set(f["covid_groups"]) for f in folds]
    stems = [set(f["medseg_stems"]) for f in folds]
    assert set().union(*groups) == COVID_GROUPS and sum(map(len, groups)) == len(COVID_GROUPS)
    assert set().union(*stems) == MEDSEG_STEMS and sum(map(len, stems)) == len(MEDSEG_STEMS)
    assert [len(s) for s in stems] == [20, 15, 15]
    # each fold holds out both sources of COVID-19-CT-Seg
    assert all({g.split("_")[0] for g in gs} == {"coronacases", "radiopaedia"} for gs in groups)


def _fake_data(tmp: Path):
    """A covid root (two patient groups of two real slices each) and a MedSeg root (two real images), with a
    two-fold folds file."""
    covid, medseg = tmp / "covid", tmp / "medseg"
    for d in (covid / "images", covid / "masks", medseg / "images", medseg / "masks"):
        d.mkdir(parents=True)
    rows = ["file,inferred_volume,inferred_patient_group"]
    for name, group in (("0300", "p1"), ("0340", "p1"), ("1000", "p2"), ("1530", "p2")):
        shutil.copy(FX / "slices" / f"covid_{name}.png", covid / "images" / f"{name}.png")
        shutil.copy(FX / "masks" / f"covid_{name}.png", covid / "masks" / f"{name}.png")
        rows.append(f"{name}.png,{group},{group}")
    (covid / "slice_to_volume.csv").write_text("\n".join(rows) + "\n")
    for stem in ("5", "20"):
        shutil.copy(FX / "slices" / f"medseg_{stem}.jpg", medseg / "images" / f"{stem}.jpg")
        shutil.copy(FX / "masks" / f"medseg_{stem}.png", medseg / "masks" / f"{stem}.png")
    folds = tmp / "folds.json"
    folds.write_text(json.dumps({"k": 2, "folds": [{"covid_groups": ["p1"], "medseg_stems": ["5"]},
                                                   {"covid_groups": ["p2"], "medseg_stems": ["20"]}]}))
    return covid, medseg, folds


def test_split_by_fold_and_all(tmp_path):
    covid, medseg, folds = _fake_data(tmp_path)
    train, val_c, val_m = data.split(covid, medseg, fold=1, folds_file=folds)
    assert sorted(s.image.name for s in val_c) == ["1000.png", "1530.png"]
    assert [s.image.name for s in val_m] == ["20.jpg"]
    assert sorted(s.image.name for s in train) == ["0300.png", "0340.png", "5.jpg"]
    train, val_c, val_m = data.split(covid, medseg, fold="all", folds_file=folds)
    assert len(train) == 6 and val_c == [] and val_m == []
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        data.split(covid, medseg, fold=2, folds_file=folds)


def test_train_refuses_a_fold_that_does_not_exist(tmp_path, capsys):
    from training import train

    covid, medseg, _ = _fake_data(tmp_path)
    rc = train.main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--run-dir", str(tmp_path / "r"),
                     "--fold", "7"])
    assert rc == 2 and "fold 7 does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--run-dir", str(tmp_path / "r"), "--fold", "first"])
    assert "fold must be a whole number or 'all'" in capsys.readouterr().err


def test_train_argv_is_the_recipe():
    argv = cv.train_argv("light16", 2, "C", "M", "runs/cv")
    assert argv[:8] == ["--covid-root", "C", "--medseg-root", "M", "--run-dir", "runs/cv/light16/fold2", "--fold", "2"]
    assert dict(zip(argv[8::2], argv[9::2]))["--augment"] == "light"
    assert cv.fold_dir("runs/cv", "light16", "all") == Path("runs/cv/light16/final")
    with pytest.raises(ValueError, match="unknown recipe"):
        cv.train_argv("nope", 0, "C", "M", "r")
    bf16 = dict(zip(*[iter(cv.train_argv("light22-bf16", "all", "C", "M", "r")[8:])] * 2))
    assert bf16["--precision"] == "bf16" and bf16["--medseg-fraction"] == "0.3" and bf16["--epochs"] == "22"


@pytest.mark.parametrize("recipe", sorted(cv.RECIPES))
def test_every_recipe_parses_as_train_arguments(recipe):
    """A misspelt key or value in a recipe fails here, not hours into a session."""
    from training import train

    p = train.argparse.ArgumentParser()
    train.add_arguments(p)
    stages = cv.train_stages(recipe, 0, "C", "M", "r")
    options = {k: v for k, v in cv.RECIPES[recipe].items() if k != cv.THEN}
    for i, argv in enumerate(stages):
        args = p.parse_args(argv)
        expected = {**options, **(cv.RECIPES[recipe][cv.THEN] if i else {})}
        for key, value in expected.items():
            assert getattr(args, key) == value
    assert len(stages) == (2 if cv.THEN in cv.RECIPES[recipe] else 1)


def test_a_staged_recipe_fine_tunes_from_its_first_stage():
    first, then = cv.train_stages("shipped-cv", 1, "C", "M", "r")
    assert first[first.index("--run-dir") + 1] == "r/shipped-cv/fold1/stage1" and "--init-weights" not in first
    assert then[then.index("--run-dir") + 1] == "r/shipped-cv/fold1"
    assert then[then.index("--init-weights") + 1] == "r/shipped-cv/fold1/stage1/last.h5"
    opts = dict(zip(then[8::2], then[9::2]))
    assert (opts["--epochs"], opts["--augment"], opts["--lr"], opts["--medseg-fraction"]) == ("4", "light", "0.00015", "0.2")
    assert cv.train_argv("shipped-cv", 1, "C", "M", "r") == first


def test_threads_option_defaults_to_every_core():
    from training import train

    p = train.argparse.ArgumentParser()
    train.add_arguments(p)
    assert p.parse_args(["--run-dir", "r"]).threads == 0 and p.parse_args(["--run-dir", "r", "--threads", "1"]).threads == 1


def _metrics(fold, covid, medseg, hours):
    return {"fold": fold, "epoch": 16, "epochs": 16, "train_hours": hours,
            "covid": {"mean_dice": covid, "n_images": 500}, "medseg": {"mean_dice": medseg, "n_images": 15}}


def test_table_gives_per_fold_and_mean_with_sample_sd(tmp_path):
    for fold, c, m, h in ((0, 0.70, 0.74, 2.0), (1, 0.74, 0.78, 2.5)):
        d = tmp_path / "recipeA" / f"fold{fold}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(fold, c, m, h)))
    (tmp_path / "recipeB" / "fold0").mkdir(parents=True)  # a recipe with no finished fold is not listed
    results = cv.collect(tmp_path)
    assert list(results) == ["recipeA"]
    table = cv.markdown_table(results, k=3)
    # mean 0.72, sample sd sqrt(2 * 0.02^2 / 1) = 0.0283
    assert "| recipeA | 2 of 3 | 0: 0.700, 1: 0.740 | 0.720 ± 0.028 | 0: 0.740, 1: 0.780 | 0.760 ± 0.028 | 4.5 |" in table


def test_a_tiny_fold_trains_and_evaluates_end_to_end(tmp_path, monkeypatch, capsys):
    covid, medseg, folds = _fake_data(tmp_path)
    monkeypatch.setattr(data, "FOLDS_FILE", folds)
    monkeypatch.setitem(cv.RECIPES, "tiny", {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "crop": 64,
                                             "augment": "light", "val_limit": 1, "precision": "bf16"})
    base = ["--recipe", "tiny", "--covid-root", str(covid), "--medseg-root", str(medseg),
            "--run-root", str(tmp_path / "cv")]
    # a bf16 recipe trained in fp32 on a CPU without bf16 instructions
    assert cv.main(["train", *base, "--fold", "0", "--precision", "fp32"]) == 0
    run_dir = tmp_path / "cv" / "tiny" / "fold0"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["epoch"] == 1 and state["args"]["fold"] == 0 and (run_dir / "last.h5").is_file()
    assert state["args"]["precision"] == "fp32"
    capsys.readouterr()
    assert cv.main(["evaluate", *base]) == 0  # fold 1 is not trained: skipped, fold 0 evaluated
    out = capsys.readouterr().out
    assert "fold 1: not finished (0 epochs), skipped" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # fold 0 holds out group p1 (two slices) and MedSeg image 5: every held-out slice is scored, not val_limit
    assert metrics["covid"]["n_images"] == 2 and metrics["medseg"]["n_images"] == 1 and 0.0 <= metrics["covid"]["mean_dice"] <= 1
    assert metrics["precision"] == "fp32"
    assert cv.main(["table", "--run-root", str(tmp_path / "cv"), "--out", str(tmp_path / "t.md")]) == 0
    assert "| tiny | 1 of 2 |" in (tmp_path / "t.md").read_text()
    # --record keeps the small files of the fold (no weights) in the committed layout; table and plot read it.
    # The fold already scored its last.h5 (metrics.json names the weights' sha256): kept, not scored again.
    assert metrics["weights_sha256"] == file_digest(run_dir / "last.h5")
    assert cv.main(["evaluate", *base, "--record", str(tmp_path / "record")]) == 0
    assert "fold 0: metrics.json already scores its last.h5, kept" in capsys.readouterr().out
    kept = tmp_path / "record" / "tiny" / "fold0"
    assert sorted(p.name for p in kept.iterdir()) == ["log.csv", "metrics.json"]
    assert json.loads((kept / "metrics.json").read_text()) == metrics
    assert cv.main(["table", "--run-root", str(tmp_path / "record"), "--plot", str(tmp_path / "c.png")]) == 0
    assert "| tiny | 1 of 2 |" in capsys.readouterr().out and (tmp_path / "c.png").stat().st_size > 1000
    # a serving-scale probe scores the same slices into its own file; the recipe's metrics.json is untouched
    assert cv.main(["evaluate", *base, "--canvas", "512", "--record", str(tmp_path / "record")]) == 0
    probe = json.loads((run_dir / "metrics-canvas512.json").read_text())
    assert probe["canvas"] == 512 and metrics["canvas"] == 448 and probe["covid"]["n_images"] == 2
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert (kept / "metrics-canvas512.json").is_file()
    with pytest.raises(SystemExit):
        cv.main(["evaluate", *base, "--canvas", "500"])  # only the probes fixed in advance
    # new weights in the fold (a resumed run, a longer schedule) are scored again; --force scores anyway
    scored = []
    monkeypatch.setattr(cv, "evaluate_fold", lambda fd, *a, **kw: scored.append(fd.name) or metrics)
    assert cv.main(["evaluate", *base]) == 0 and scored == []
    assert cv.main(["evaluate", *base, "--force"]) == 0 and scored == ["fold0"]
    with (run_dir / "last.h5").open("ab") as f:
        f.write(b"\0")
    assert cv.scored_metrics(run_dir) is None and cv.scored_metrics(run_dir, 512) is None
    assert cv.main(["evaluate", *base]) == 0 and scored == ["fold0", "fold0"]


def test_zoomed_prediction_runs_the_model_on_the_enlarged_canvas_and_returns_the_canvas_size():
    import numpy as np

    seen = []

    def identity(x):
        seen.append(x.shape)
        return x[..., 0]

    x = np.random.default_rng(0).random((2, 448, 448, 1), dtype=np.float32)
    x[:, 100:200, 100:200] = 0.5  # a flat patch survives cubic up- and area down-sampling unchanged
    out = cv.zoomed(identity, 512)(x)
    assert seen == [(2, 512, 512, 1)] and out.shape == (2, 448, 448)
    assert np.allclose(out[:, 110:190, 110:190], 0.5, atol=1e-5) and out.min() >= 0 and out.max() <= 1


def test_a_staged_fold_trains_both_stages_and_records_one_log(tmp_path, monkeypatch, capsys):
    covid, medseg, folds = _fake_data(tmp_path)
    monkeypatch.setattr(data, "FOLDS_FILE", folds)
    monkeypatch.setitem(cv.RECIPES, "tiny2", {"epochs": 2, "steps_per_epoch": 1, "batch_size": 2, "crop": 64,
                                              "augment": "full", "val_limit": 1,
                                              "then": {"epochs": 1, "augment": "light", "lr": 1e-4}})
    base = ["--recipe", "tiny2", "--covid-root", str(covid), "--medseg-root", str(medseg),
            "--run-root", str(tmp_path / "cv")]
    assert cv.main(["train", *base, "--fold", "0"]) == 0
    run_dir = tmp_path / "cv" / "tiny2" / "fold0"
    first = json.loads((run_dir / "stage1" / "state.json").read_text())
    then = json.loads((run_dir / "state.json").read_text())
    assert first["epoch"] == 2 and first["args"]["augment"] == "full" and first["args"]["init_weights"] is None
    assert then["epoch"] == 1 and then["args"]["augment"] == "light" and then["args"]["lr"] == 1e-4
    assert then["args"]["init_weights"] == str(run_dir / "stage1" / "last.h5")
    assert "initialised from" in capsys.readouterr().out
    # training it again trains nothing: the first stage is skipped, the second is at its last epoch
    assert cv.main(["train", *base, "--fold", "0"]) == 0
    assert "stage1: finished, next stage" in capsys.readouterr().out
    assert cv.main(["evaluate", *base, "--record", str(tmp_path / "record")]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["epochs"]) == (3, 3)  # both stages count
    log = (tmp_path / "record" / "tiny2" / "fold0" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log] == ["epoch", "1", "2", "3"]


def test_status_counts_epochs_over_stages_and_times_what_is_left(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cv.RECIPES, "tiny2", {"epochs": 2, "lr": 1e-3, "then": {"epochs": 3, "lr": 1e-4}})
    stage1 = tmp_path / "tiny2" / "fold1" / "stage1"
    stage1.mkdir(parents=True)
    (stage1 / "state.json").write_text(json.dumps({"epoch": 2, "args": {"epochs": 2}}))
    header = "epoch,lr,loss,train_iou,val_dice_covid,val_dice_medseg,score,seconds\n"
    (stage1 / "log.csv").write_text(header + "1,0.001,1.2,0.1,0.10,0.20,0.15,100\n"
                                    "2,0.001,1.0,0.2,0.30,0.40,0.35,110\n")
    st = cv.fold_status("tiny2", "1", tmp_path)
    # stage 1 done (2 of 2), the fine-tune not started: 3 epochs left at the last epochs' median 105 s
    assert (st["epochs_done"], st["epochs_planned"]) == (2, 5)
    assert (st["val_dice_covid"], st["val_dice_medseg"], st["seconds_per_epoch"]) == (0.30, 0.40, 105.0)
    assert st["hours_left"] == pytest.approx(3 * 105 / 3600)
    (tmp_path / "tiny2" / "fold1" / "log.csv").write_text(header + "1,0.0001,0.9,0.3,0.5,0.6,0.55,90\n")
    assert cv.fold_status("tiny2", "1", tmp_path)["seconds_per_epoch"] == 100  # median of 100, 110, 90
    # one epoch that shared the CPU (3000 s) does not set the pace: the median of 100, 110, 90, 3000 is 105
    (tmp_path / "tiny2" / "fold1" / "log.csv").write_text(header + "1,0.0001,0.9,0.3,0.5,0.6,0.55,90\n"
                                                         "2,0.0001,0.9,0.3,0.5,0.6,0.55,3000\n")
    assert cv.fold_status("tiny2", "1", tmp_path)["seconds_per_epoch"] == 105
    (tmp_path / "tiny2" / "fold1" / "log.csv").write_text(header + "1,0.0001,0.9,0.3,0.5,0.6,0.55,90\n")
    (tmp_path / "not-a-recipe" / "fold0").mkdir(parents=True)  # other folders under the run root are ignored
    assert cv.main(["status", "--run-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| tiny2")]
    assert rows == ["| tiny2 | 1 | 3/5 | 0.500 | 0.600 | 100 | 0.06 | 0 min ago |"] and "stopped" not in out
    # the newest log was written 250 s ago, 2.5x the 100 s pace, with 2 epochs left: the run has stopped
    import os
    import time

    os.utime(stage1 / "log.csv", (time.time() - 400,) * 2)
    os.utime(tmp_path / "tiny2" / "fold1" / "log.csv", (time.time() - 250,) * 2)
    st = cv.fold_status("tiny2", "1", tmp_path)
    assert st["stopped"] and st["seconds_since_epoch"] == pytest.approx(250, abs=5)
    assert not cv.fold_status("tiny2", "1", tmp_path, now=time.time() - 100)["stopped"]  # 150 s: still running
    assert cv.main(["status", "--run-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 4 min ago (stopped?) |" in out and "no epoch for more than twice the pace): tiny2 fold 1." in out
    # a run started by `train` holds the fold's lock while it lives: it is training however old its last epoch,
    # and a second `train` of the fold is refused; once the process is gone the fold has stopped, for certain
    fold1 = tmp_path / "tiny2" / "fold1"
    with cv.training_lock(fold1):
        st = cv.fold_status("tiny2", "1", tmp_path)
        assert st["training_pid"] == os.getpid() and not st["stopped"]
        assert cv.main(["status", "--run-root", str(tmp_path)]) == 0
        assert f"| 4 min ago (training, pid {os.getpid()}) |" in capsys.readouterr().out
        argv = ["train", "--recipe", "tiny2", "--fold", "1", "--covid-root", "-", "--medseg-root", "-",
                "--run-root", str(tmp_path)]
        assert cv.main(argv) == 2
        assert f"{fold1} is being trained by another process (pid {os.getpid()})" in capsys.readouterr().err
    st = cv.fold_status("tiny2", "1", tmp_path)
    assert st["training_pid"] is None and st["stopped"]
    assert cv.main(["status", "--run-root", str(tmp_path)]) == 0
    assert "| 4 min ago (stopped) |" in capsys.readouterr().out


def test_publish_needs_every_fold_and_a_recipe_that_beats_the_shipped_weights(tmp_path, capsys):
    from training import publish_cv

    record, runs = tmp_path / "record", tmp_path / "runs"
    weights = tmp_path / "w" / "model.h5"
    weights.parent.mkdir()
    card = {"validation_metrics": {"covid19-ct-seg-256 held-out groups": {"mean_dice": 0.704},
                                   "medseg-100-train held-out images": {"mean_dice": 0.731}}}
    weights.with_suffix(".json").write_text(json.dumps(card))
    assert publish_cv.shipped_bar(card) == {"covid": 0.704, "medseg": 0.731}
    assert publish_cv.shipped_bar({"cross_validation": {"covid": {"mean": 0.8}, "medseg": {"mean": 0.7}}}) == \
        {"covid": 0.8, "medseg": 0.7}
    # the shipped recipe's own CV replaces the held-out figures once every fold is in, not before
    own = {"shipped-cv": {"folds": {"0": {}, "1": {}}, "covid": (0.64, 0.03), "medseg": (0.70, 0.03)}}
    assert publish_cv.shipped_bar(card, own, k=3) == {"covid": 0.704, "medseg": 0.731}
    own["shipped-cv"]["folds"]["2"] = {}
    assert publish_cv.shipped_bar(card, own, k=3) == {"covid": 0.64, "medseg": 0.70}
    assert publish_cv.shipped_bar({"cross_validation": {"covid": {"mean": 0.8}, "medseg": {"mean": 0.7}}}, own) == \
        {"covid": 0.8, "medseg": 0.7}
    base = ["publish", "--recipe", "light16", "--record", str(record), "--run-root", str(runs),
            "--covid-root", "C", "--medseg-root", "M", "--weights-out", str(weights)]
    for fold, c, m in ((0, 0.70, 0.80), (1, 0.72, 0.78)):
        d = record / "light16" / f"fold{fold}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(fold, c, m, 1.0)))
    assert cv.main(base) == 2 and "2 of 3 folds" in capsys.readouterr().err
    (record / "light16" / "fold2").mkdir()
    (record / "light16" / "fold2" / "metrics.json").write_text(json.dumps(_metrics(2, 0.71, 0.76, 1.0)))
    assert cv.main(base) == 2 and "final run" in capsys.readouterr().err
    final = runs / "light16" / "final"
    final.mkdir(parents=True)
    (final / "state.json").write_text(json.dumps({"epoch": 16, "args": {"epochs": 16}, "train_seconds": 3600}))
    # both sets must reach the bar: MedSeg 0.780 does, covid (0.60, 0.72, 0.71: mean 0.677, sd 0.067) does not
    (record / "light16" / "fold0" / "metrics.json").write_text(json.dumps(_metrics(0, 0.60, 0.80, 1.0)))
    assert cv.main(base) == 1
    out = capsys.readouterr().out
    assert "light16 CV: covid 0.6767 ± 0.0666, MedSeg 0.7800 ± 0.0200" in out and "not published" in out
    assert json.loads(weights.with_suffix(".json").read_text()) == card and not weights.exists()
    summary = publish_cv.cv_summary("light16", cv.collect(record)["light16"], 3)
    assert summary["per_fold"]["2"]["covid"]["mean_dice"] == 0.71 and summary["cpu_hours"] == 3.0
    # with the shipped recipe cross-validated on every fold, the bar is its CV means (0.69, 0.70 here)
    for fold, c in enumerate((0.68, 0.69, 0.70)):
        d = record / "shipped-cv" / f"fold{fold}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(fold, c, 0.70, 1.0)))
    assert cv.main(base) == 1
    assert "shipped: covid 0.6900, MedSeg 0.7000" in capsys.readouterr().out
    (runs / "shipped-cv" / "final").mkdir(parents=True)
    (runs / "shipped-cv" / "final" / "state.json").write_text((final / "state.json").read_text())
    assert cv.main([*base[:2], "shipped-cv", *base[3:]]) == 1
    assert "whose CV is the bar itself" in capsys.readouterr().out and not weights.exists()


def test_plan_times_the_recipes_step_and_counts_every_stage(monkeypatch, capsys):
    import re

    monkeypatch.setitem(cv.RECIPES, "tiny-plan", {"epochs": 2, "steps_per_epoch": 3, "batch_size": 2, "crop": 64,
                                                  "precision": "bf16", "then": {"epochs": 1, "lr": 1e-4}})
    assert cv.fold_steps("tiny-plan") == 2 * 3 + 1 * 3
    assert cv.fold_steps("shipped-cv") == 36 * 150 + 4 * 150  # the shipped weights' schedule, both stages
    # timed as `train --precision fp32` would train this bf16 recipe
    assert cv.main(["plan", "--recipe", "tiny-plan", "--steps", "1", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    m = re.match(r"tiny-plan: 9 steps per fold, fp32, threads all: ([0-9.]+) s per step here, ([0-9.]+) h per fold",
                 out)
    assert m and float(m[1]) > 0 and float(m[2]) == pytest.approx(9 * float(m[1]) / 3600, abs=0.006)
    assert "warning" not in out


def test_bf16_is_flagged_on_cpus_without_bf16_instructions():
    assert "bf16 runs slower than fp32 here" in cv.precision_warning("bf16", {"avx2", "fma"})
    assert cv.precision_warning("bf16", {"avx2", "amx_bf16"}) is None
    assert cv.precision_warning("bf16", {"avx512f", "avx512_bf16"}) is None
    assert cv.precision_warning("fp32", {"avx2"}) is None
