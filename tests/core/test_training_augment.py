"""training.augment: the augmentation profiles keep image and mask aligned; `light` stays closer to serving."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from training import augment
from training.augment import FULL, LIGHT, PROFILES, make_example


def _disk_slice(h=256, w=240):
    """A gray 'body' with one bright lesion whose mask is exactly the bright pixels."""
    img = np.full((h, w), 60, np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (w // 2 - 10, h // 2 - 20), 0, 0, 360, 110, -1)
    cv2.circle(img, (w // 2 + 30, h // 2 - 25), 28, 230, -1)
    return img, (img == 230).astype(np.uint8)


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


@pytest.mark.parametrize("name", sorted(PROFILES))
@pytest.mark.parametrize("domain", ["covid", "medseg"])
def test_every_profile_keeps_mask_on_the_lesion(name, domain):
    img, mask = _disk_slice()
    for seed in range(12):
        x, y = make_example(img, mask, np.random.default_rng(seed), domain, profile=PROFILES[name])
        assert x.shape == y.shape == (448, 448) and x.dtype == y.dtype == np.float32
        assert set(np.unique(y)) <= {0.0, 1.0} and y.sum() > 0
        # image and mask got the same warp: the masked pixels are the bright lesion, the ring just outside is not
        inside = cv2.erode(y, np.ones((5, 5), np.uint8)) > 0
        ring = (cv2.dilate(y, np.ones((9, 9), np.uint8)) > 0) & ~(cv2.dilate(y, np.ones((5, 5), np.uint8)) > 0)
        assert x[inside].mean() > x[ring].mean() + 0.15


def _mean_change(profile, n=32):
    """Mean body-mask IoU with the serving one (geometry) and mean |change| of `_appearance` (0-255 scale)."""
    img, _ = _disk_slice()
    body = (img >= 110).astype(np.uint8)  # a large region, so IoU measures the warp rather than the lesion size
    _, y0 = make_example(img, body, None)
    iou, dv = [], []
    for seed in range(n):
        _, y = make_example(img, body, np.random.default_rng(seed), "covid", profile=profile)
        iou.append(_iou(y > 0, y0 > 0))
        out = augment._appearance(img, np.random.default_rng(seed), profile)
        dv.append(np.abs(out.astype(np.float32) - img).mean())
    return float(np.mean(iou)), float(np.mean(dv))


def test_light_profile_stays_closer_to_the_serving_input_than_full():
    iou_full, change_full = _mean_change(FULL)
    iou_light, change_light = _mean_change(LIGHT)
    assert iou_light > iou_full + 0.08
    assert change_light < 0.7 * change_full


def test_profiles_are_narrower_field_by_field():
    # light is full with every range and probability shrunk, nothing widened
    for field in ("max_angle", "medseg_turn_p", "max_log_aspect", "max_shift", "gamma_p", "max_log_gamma",
                  "contrast_p", "max_brightness", "blur_p", "noise_p", "jpeg_p"):
        assert getattr(LIGHT, field) < getattr(FULL, field), field
    for domain in ("covid", "medseg"):
        (lo_f, hi_f), (lo_l, hi_l) = FULL.zoom[domain], LIGHT.zoom[domain]
        assert lo_f < lo_l < hi_l < hi_f
    assert LIGHT.clahe_serving_p > FULL.clahe_serving_p
    assert augment.PROFILES["full"] is FULL


def test_train_cli_takes_the_profile(monkeypatch, tmp_path, capsys):
    import cli as cli
    from training import train

    seen = {}
    monkeypatch.setattr(train, "run", lambda args: seen.setdefault("args", args) and 0)
    base = ["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--run-dir", str(tmp_path / "run")]
    assert cli.main(base) == 0 and seen.pop("args").augment == "full"
    assert cli.main(base + ["--augment", "light"]) == 0 and seen.pop("args").augment == "light"
    capsys.readouterr()
    assert cli.main(base + ["--augment", "wild"]) == 2 and "args" not in seen
    assert "invalid choice: 'wild'" in capsys.readouterr().err


def test_batches_use_the_chosen_profile(monkeypatch):
    from types import SimpleNamespace

    from training import train

    used = []
    real = augment.make_example

    def spy(*a, **k):
        used.append(k.get("profile"))
        return real(*a, **k)

    monkeypatch.setattr(augment, "make_example", spy)
    img, mask = _disk_slice()
    args = SimpleNamespace(crop=224, batch_size=2, medseg_fraction=0.0, no_augment=False, augment="light")
    x, y = next(train.batches([(img, mask, "covid")], args, np.random.default_rng(0)))
    assert x.shape == y.shape == (2, 224, 224, 1) and used == [LIGHT, LIGHT]
    del args.augment  # a run saved before profiles existed resumes with the full profile
    next(train.batches([(img, mask, "covid")], args, np.random.default_rng(0)))
    assert used[2:] == [FULL, FULL]


def test_lung_framed_medseg_takes_the_covid_zoom_range():
    """Framed, both domains are served at one scale: zoom_domain="covid" keeps MedSeg from being zoomed out."""
    import math

    from training.augment import LIGHT, _affine

    def zooms(**kw):
        rng = np.random.default_rng(3)
        out = []
        for _ in range(300):
            m = _affine(200, 200, 448, rng, "medseg", LIGHT, **kw)
            out.append(math.sqrt(abs(np.linalg.det(m[:, :2]))) / (448 / 200))
        return np.array(out)

    own, framed = zooms(), zooms(zoom_domain="covid")
    slack = math.exp(LIGHT.max_log_aspect / 2)  # the aspect change moves the area by at most this
    assert own.min() < 0.65 and framed.min() >= 0.85 / slack and framed.max() <= 1.25 * slack


def test_component_sampling_centres_small_lesions_as_often_as_big_ones():
    """One 10,000-pixel lesion and one 25-pixel focus in opposite corners: by pixel, crops almost never reach
    the focus; by component, about half of them are centred on it."""
    x = np.zeros((448, 448), np.float32)
    y = np.zeros((448, 448), np.float32)
    y[10:110, 10:110] = 1
    y[420:425, 420:425] = 1

    def share_on_focus(sampling):
        rng = np.random.default_rng(7)
        hits = 0
        for _ in range(400):
            _, cy = augment.random_crop(x, y, 224, rng, lesion_bias=1.0, lesion_sampling=sampling)
            hits += cy.sum() == 25  # the crop holds the focus and none of the big lesion
        return hits / 400

    assert share_on_focus("pixel") < 0.02
    assert 0.4 < share_on_focus("component") < 0.6
    with pytest.raises(ValueError, match="lesion_sampling"):
        augment.random_crop(x, y, 224, np.random.default_rng(0), lesion_sampling="area")


def test_pixel_sampling_is_the_default_and_unchanged():
    """Recipes recorded before component sampling existed draw the same crops."""
    img, mask = _disk_slice(448, 448)
    x, y = img.astype(np.float32), mask.astype(np.float32)
    a = augment.random_crop(x, y, 224, np.random.default_rng(5))
    b = augment.random_crop(x, y, 224, np.random.default_rng(5), lesion_sampling="pixel")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_batches_and_cli_take_the_lesion_sampling(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import cli as cli
    from training import train

    used = []
    real = augment.random_crop
    monkeypatch.setattr(augment, "random_crop", lambda *a, **k: used.append(k["lesion_sampling"]) or real(*a, **k))
    img, mask = _disk_slice()
    args = SimpleNamespace(crop=224, batch_size=2, medseg_fraction=0.0, no_augment=False, augment="light",
                           lesion_sampling="component")
    next(train.batches([(img, mask, "covid")], args, np.random.default_rng(0)))
    del args.lesion_sampling  # a run saved before the option resumes with pixel sampling
    next(train.batches([(img, mask, "covid")], args, np.random.default_rng(0)))
    assert used == ["component", "component", "pixel", "pixel"]

    seen = {}
    monkeypatch.setattr(train, "run", lambda a: seen.setdefault("args", a) and 0)
    base = ["train", "--images", str(tmp_path), "--masks", str(tmp_path), "--run-dir", str(tmp_path / "run")]
    assert cli.main(base) == 0 and seen.pop("args").lesion_sampling == "pixel"
    assert cli.main(base + ["--lesion-sampling", "component"]) == 0 and seen.pop("args").lesion_sampling == "component"
