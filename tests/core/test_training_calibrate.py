"""training.calibrate: per-image Dice per threshold is hand-checkable; the chosen threshold maximizes the mean over
domains (ties to the smallest change); the bias shift makes 0.5 on the new output equal the chosen threshold on
the old one; bad inputs give a message and exit code 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.core import model as model_lib
from training import calibrate


def test_dice_by_threshold_hand_computed():
    prob = np.array([[0.9, 0.4], [0.3, 0.1]], dtype=np.float32)
    mask = np.array([[1, 1], [1, 0]], dtype=np.uint8)
    empty = (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.uint8))
    got = calibrate.dice_by_threshold([(prob, mask), empty], [0.25, 0.5])
    # t=0.25: pred {0.9, 0.4, 0.3} = 3 px, all positive -> 2*3/(3+3) = 1; t=0.5: pred {0.9} -> 2*1/(1+3) = 0.5
    assert got.shape == (2, 2)
    assert got[0].tolist() == [1.0, 0.5]
    assert got[1].tolist() == [1.0, 1.0]  # nothing predicted, nothing there


def test_choose_threshold_mean_over_domains_and_tie_break():
    ths = [0.3, 0.4, 0.5]
    a = np.array([[0.6, 0.7, 0.5]])
    b = np.array([[0.8, 0.5, 0.6], [0.8, 0.5, 0.6]])   # domain means are averaged, not pooled by image count
    t, score = calibrate.choose_threshold({"a": a, "b": b}, ths)
    assert np.allclose(score, [0.7, 0.6, 0.55]) and t == 0.3
    tie = np.array([[0.5, 0.6, 0.6]])
    assert calibrate.choose_threshold({"x": tie}, ths)[0] == 0.5


def test_bias_shift_moves_the_threshold_to_one_half():
    import tensorflow as tf

    keras = tf.keras
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(1, 3, padding="same", name="final_conv")(x)
    m = keras.Model(inp, keras.layers.Activation("sigmoid")(x))
    x_in = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype(np.float32)
    before = m.predict_on_batch(x_in)
    t = float(np.quantile(before, 0.3))
    calibrate.shift_output_bias(m, calibrate.bias_shift(t))
    after = m.predict_on_batch(x_in)
    z_before = np.log(before / (1 - before))
    assert np.allclose(np.log(after / (1 - after)), z_before + np.log((1 - t) / t), atol=1e-4)
    away = np.abs(before - t) > 1e-4        # away from the boundary itself, the decisions agree exactly
    assert np.array_equal((after >= 0.5)[away], (before >= t)[away]) and (before >= t).mean() > 0.5
    assert calibrate.bias_shift(0.5) == 0.0
    with pytest.raises(ValueError):
        calibrate.bias_shift(1.0)


def test_cli_refuses_bad_and_already_calibrated_weights(tmp_path, capsys):
    bad = tmp_path / "x.h5"
    bad.write_bytes(b"not hdf5")
    args = ["--out", str(tmp_path / "o.h5"), "--covid-root", str(tmp_path), "--medseg-root", str(tmp_path)]
    assert calibrate.main(["--weights", str(bad), *args]) == 2
    assert "not an HDF5" in capsys.readouterr().err
    assert calibrate.main(["--weights", str(tmp_path / "missing.h5"), *args]) == 2
    assert "not found" in capsys.readouterr().err

    import tensorflow as tf

    inp = tf.keras.Input((4, 4, 1))
    m = tf.keras.Model(inp, tf.keras.layers.Conv2D(1, 1, name="final_conv")(inp))
    done = model_lib.save_weights(m, tmp_path / "c.h5", metadata={"output_calibration": {"threshold": 0.3}})
    assert calibrate.main(["--weights", str(done), *args]) == 2
    assert "already calibrated" in capsys.readouterr().err
    assert calibrate.main(["--weights", str(done), "--thresholds", "1.5", *args]) == 2
    assert not (tmp_path / "o.h5").exists()


def test_evaluate_samples_scores_at_each_masks_own_size():
    """publish.evaluate_samples and calibrate share native_probabilities: an all-ones prediction (448²) resized to
    each 256² mask gives Dice 2|M| / (|M| + N) per image and sensitivity 1."""
    import cv2

    from training import data
    from training.publish import evaluate_samples, native_probabilities

    fx = Path(__file__).resolve().parents[1] / "fixtures"
    samples = [data.Sample(fx / "slices" / f"{n}.png", fx / "masks" / f"{n}.png", "covid", n)
               for n in ("covid_0300", "covid_1000")]
    ones = lambda x: np.ones(x.shape[:3], np.float32)  # noqa: E731
    got = [(s.image.name, p.shape, float(p.min())) for s, _, p in native_probabilities(ones, samples)]
    masks = [cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE) > 0 for s in samples]
    assert got == [(s.image.name, m.shape, 1.0) for s, m in zip(samples, masks)]
    m = evaluate_samples(ones, samples)
    dice = [2 * k.sum() / (k.sum() + k.size) for k in masks]
    assert m["n_images"] == 2 and m["sensitivity"] == 1.0 and m["specificity"] == 0.0
    assert m["mean_dice"] == pytest.approx(np.mean(dice), abs=1e-12)
