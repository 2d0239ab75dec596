"""training.scale_probe and training.cv.multiscale: serving-scale probes of one set of weights on a held-out split
(the shipped weights on the committed fixture slices, folds from a two-fold file)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from training import cv, data, scale_probe
from tests.core.test_training_cv import _fake_data


def test_multiscale_averages_the_maps_of_each_canvas_at_the_served_size():
    seen = []

    def canvas_side(x):
        # a constant map that says which canvas the model saw: 0.448 on 448, 0.512 on 512
        seen.append(x.shape)
        return np.full(x.shape[:3], x.shape[1] / 1000, dtype=np.float32)

    x = np.zeros((2, 448, 448, 1), dtype=np.float32)
    out = cv.multiscale(canvas_side, (448, 512))(x)
    assert seen == [(2, 448, 448, 1), (2, 512, 512, 1)] and out.shape == (2, 448, 448)
    assert np.allclose(out, (0.448 + 0.512) / 2, atol=1e-6)
    # one canvas of 448 is the model itself, untouched
    assert np.array_equal(cv.multiscale(canvas_side, (448,))(x), canvas_side(x))


@pytest.mark.parametrize("text, expected", [("512", ("512", (512,))), ("448+576", ("448+576", (448, 576)))])
def test_a_probe_names_its_canvases(text, expected):
    assert scale_probe.parse_probe(text) == expected


@pytest.mark.parametrize("text", ["500", "448+", "big"])
def test_only_the_served_canvas_and_the_zoom_probes_fixed_in_advance_are_accepted(text, capsys):
    with pytest.raises(SystemExit):
        scale_probe.main(["--covid-root", "x", "--medseg-root", "y", "--probe", text])
    assert "canvases" in capsys.readouterr().err


def test_probes_score_the_held_out_fold_with_the_shipped_weights(tmp_path, monkeypatch, capsys):
    covid, medseg, folds = _fake_data(tmp_path)
    monkeypatch.setattr(data, "FOLDS_FILE", folds)
    out_json, out_md = tmp_path / "probe.json", tmp_path / "probe.md"
    rc = scale_probe.main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--fold", "0",
                           "--probe", "448", "--probe", "448+512", "--json", str(out_json), "--out", str(out_md)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["fold"] == 0 and result["framing"] == "full" and list(result["probes"]) == ["448", "448+512"]
    plain, mixed = result["probes"]["448"], result["probes"]["448+512"]
    # fold 0 holds out patient group p1 (two slices) and MedSeg image 5
    assert plain["covid"]["n_images"] == mixed["covid"]["n_images"] == 2 and plain["medseg"]["n_images"] == 1
    assert mixed["canvases"] == [448, 512]
    # the 448 probe is the CV protocol itself: the same numbers as scoring the fold's slices directly
    from shared.core import model as model_lib
    from training.publish import evaluate_samples

    model = model_lib.load_model()
    _, val_c, _ = data.split(covid, medseg, fold=0)
    direct = evaluate_samples(lambda x: model.predict_on_batch(x)[..., 0], val_c)
    assert plain["covid"]["mean_dice"] == pytest.approx(direct["mean_dice"], abs=1e-6)
    table = out_md.read_text()
    assert table in capsys.readouterr().out and f"| 448 | {plain['covid']['mean_dice']:.4f} | +0.0000 |" in table
    assert "| 448+512 |" in table


def test_a_split_that_holds_nothing_out_is_refused(tmp_path, monkeypatch, capsys):
    covid, medseg, folds = _fake_data(tmp_path)
    monkeypatch.setattr(data, "FOLDS_FILE", folds)
    assert scale_probe.main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--fold", "all"]) == 2
    assert "holds nothing out" in capsys.readouterr().err
    assert scale_probe.main(["--covid-root", str(covid), "--medseg-root", str(medseg),
                             "--weights", str(tmp_path / "none.h5")]) == 2
    assert "no weights file" in capsys.readouterr().err
