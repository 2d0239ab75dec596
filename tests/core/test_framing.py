"""shared.core.framing: frames, the pre-cropped rule, the learned lung frame on the real fixture slices, and the
same framed input in training and serving."""
from __future__ import annotations

import numpy as np
import pytest

from shared.core import framing
from shared.core.framing import Frame, border_air_fraction, frame_slices, lung_frame


def test_crop_and_paste_are_inverse_on_the_frame_and_zero_outside():
    f = Frame(2, 6, 1, 4, 8, 5)
    img = np.arange(40, dtype=np.uint8).reshape(8, 5)
    assert np.array_equal(f.crop(img), img[2:6, 1:4])
    back = f.paste(f.crop(img).astype(np.float32))
    assert back.shape == (8, 5) and back.dtype == np.float32
    assert np.array_equal(back[2:6, 1:4], img[2:6, 1:4]) and back.sum() == img[2:6, 1:4].sum()
    # a map of another size (the 448 canvas) is resized onto the frame
    assert f.paste(np.ones((448, 448))).sum() == 4 * 3
    with pytest.raises(ValueError, match="frame is for a 8x5 slice"):
        f.crop(np.zeros((5, 8)))


def test_whole_frame_is_the_identity():
    f = Frame.whole((7, 9))
    img = np.random.default_rng(0).random((7, 9)).astype(np.float32)
    assert f.is_whole and f.crop(img) is img and np.array_equal(f.paste(img), img)


def test_lung_frame_adds_the_margin_clips_and_falls_back_to_whole():
    m = np.zeros((100, 200), bool)
    m[20:60, 50:150] = True   # box 40 x 100 -> margin 2 rows, 5 columns at 5 %
    assert lung_frame(m) == Frame(18, 62, 45, 155, 100, 200)
    m[:, :3] = True           # touching the border: clipped, not padded
    assert lung_frame(m).left == 0 and lung_frame(m).top == 0
    thin = np.zeros((100, 200), bool)
    thin[2:12, 60:140] = True  # a lung base near the top: grown to 40 % of the height, slid inside the slice
    assert lung_frame(thin) == Frame(0, 40, 56, 144, 100, 200)
    tiny = np.zeros((100, 200), bool)
    tiny[50, 50:60] = True    # 10 px of 20,000: no lung found
    assert lung_frame(tiny).is_whole


def test_border_air_rule_separates_full_field_from_precropped():
    full = np.zeros((100, 100), np.uint8)
    full[20:80, 10:90] = 200  # body in the middle, air all round
    cut = np.full((100, 100), 120, np.uint8)
    cut[40:60, 40:60] = 10    # lung-cropped: tissue at every edge
    assert border_air_fraction(full) == 1.0 and border_air_fraction(cut) == 0.0
    assert frame_slices([cut], "lung") == [Frame.whole(cut.shape)]
    with pytest.raises(ValueError, match="unknown framing"):
        frame_slices([cut], "chest")


def test_lung_frames_of_the_real_fixture_slices(fixture_pairs):
    """COVID-19-CT-Seg slices (full-field) get their lung box; MedSeg slices (already cut to the lungs) stay
    whole; no infection pixel of these slices falls outside its frame."""
    frames = dict(zip([n for n, _, _ in fixture_pairs], frame_slices([img for _, img, _ in fixture_pairs], "lung")))
    assert frames["covid_0300"] == Frame(35, 166, 31, 236, 256, 256)
    assert frames["covid_1530"] == Frame(47, 155, 44, 219, 256, 256)
    assert frames["medseg_20"].is_whole and frames["medseg_5"].is_whole
    for name, img, mask in fixture_pairs:
        assert frames[name].crop(mask).sum() == mask.sum(), name
    assert round(border_air_fraction(dict((n, i) for n, i, _ in fixture_pairs)["medseg_20"]), 3) == 0.132
    assert framing.PRECROPPED_AIR_FRACTION == 0.2


def test_training_and_serving_give_the_same_lung_framed_input(fixture_pairs, threshold_model):
    """The crop step included: training's framed example (training.train.frame_examples + augment.make_example
    without augmentation) is bit-identical to what the Segmenter feeds the model for the same slice."""
    from shared.core.inference import Segmenter
    from training import train
    from training.augment import make_example

    seg = Segmenter(model=threshold_model, backend="fp32", framing="lung")
    imgs = [img for _, img, _ in fixture_pairs]
    served = seg.prepare(imgs)

    trained = train.frame_examples([(img, m.astype(np.uint8), "covid") for _, img, m in fixture_pairs], "lung")
    for (name, img, mask), (timg, tmask, _), x in zip(fixture_pairs, trained, served):
        tx, ty = make_example(timg, tmask, None)
        assert np.array_equal(tx, x[..., 0]), name
        assert ty.shape == (448, 448)
    # the covid slices are zoomed (framed), the MedSeg ones are not
    assert not np.array_equal(served[0, ..., 0], Segmenter(model=threshold_model, backend="fp32").prepare(imgs[:1])[0, ..., 0])
    assert np.array_equal(served[4:], Segmenter(model=threshold_model, backend="fp32").prepare(imgs[4:]))


def test_segmenter_pastes_lung_framed_maps_back_and_reads_framing_from_the_weights(fixture_pairs, threshold_model,
                                                                                   tmp_path):
    from shared.core import model as model_lib
    from shared.core.inference import Segmenter

    seg = Segmenter(model=threshold_model, backend="fp32", framing="lung")
    img = fixture_pairs[0][1]
    (prob,) = seg.predict([img])
    f = seg.frames([img])[0]
    assert prob.shape == img.shape and seg.describe()["framing"] == "lung"
    assert prob[:f.top].max() == 0 and prob[f.bottom:].max() == 0 and prob[:, :f.left].max() == 0
    assert prob[f.top:f.bottom, f.left:f.right].max() > 0.5
    # weights carry their framing; weights without the key are "full"
    net = model_lib.build_unet()
    lung_w = model_lib.save_weights(net, tmp_path / "lung.h5", metadata={"framing": "lung"})
    full_w = model_lib.save_weights(net, tmp_path / "full.h5", metadata={"epoch": 1})
    assert Segmenter(weights=lung_w, backend="fp32").framing == "lung"
    assert Segmenter(weights=full_w, backend="fp32").framing == "full"
    with pytest.raises(ValueError, match="unknown framing"):
        Segmenter(weights=full_w, backend="fp32", framing="chest")


def test_a_lung_framed_run_stores_its_framing_in_the_weights(tmp_path, monkeypatch):
    from shared.core.inference import inspect_weights
    from training import data, train

    from .test_training_cv import _fake_data

    covid, medseg, folds = _fake_data(tmp_path)
    monkeypatch.setattr(data, "FOLDS_FILE", folds)
    run = tmp_path / "run"
    assert train.main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--run-dir", str(run),
                       "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "64",
                       "--fold", "0", "--framing", "lung"]) == 0
    assert inspect_weights(run / "last.h5")["metadata"]["framing"] == "lung"
    # a resumed run keeps its framing whatever the command line says
    assert train.main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--run-dir", str(run),
                       "--epochs", "2", "--steps-per-epoch", "1", "--batch-size", "2", "--crop", "64"]) == 0
    assert inspect_weights(run / "last.h5")["metadata"] == {**inspect_weights(run / "last.h5")["metadata"],
                                                            "epoch": 2, "framing": "lung"}
