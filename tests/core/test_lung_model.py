"""shared.core.lung.segment_lungs with the learned lung U-Net (shared.core.lung_model) and its classical fallback.

Real model, real shipped weights (weights/covidseg-lung-unet-small.h5), real held-out slices from tests/fixtures
(all four covid fixtures come from patient groups the model never trained on). Dice thresholds are the values
measured with the shipped weights minus a margin of 0.03. Only tests/fixtures is read, never /work/shared.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.core.lung import lung_mask_from_probability, lung_mask_slice, lung_method, segment_lungs
from shared.core.lung_model import LUNG_INPUT_SIZE, LUNG_WEIGHTS, get_lung_model, prepare_lung_input

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MARGIN = 0.03
#: stem -> lung Dice measured with the shipped learned weights (classical, for comparison, in test_lung.py).
MEASURED = {
    "covid_0300": 0.923,   # coronacases_003, lung bases with dense dependent consolidation
    "covid_0340": 0.955,   # coronacases_003, large dependent consolidation
    "covid_1000": 0.980,   # coronacases_009
    "covid_1530": 0.950,   # radiopaedia_40_86625_0 (stored upside down)
}
#: Per-fixture lung Dice of the classical method (tests/core/test_lung.py MEASURED).
CLASSICAL = {"covid_0300": 0.783, "covid_0340": 0.824, "covid_1000": 0.932, "covid_1530": 0.931}


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _read(kind: str, stem: str, ext: str = ".png") -> np.ndarray:
    img = cv2.imread(str(FIXTURES / kind / f"{stem}{ext}"), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f"missing fixture {kind}/{stem}{ext}"
    return img


@pytest.fixture(scope="module")
def covid():
    """{stem: (gray, expert lung mask, expert infection mask)} for the four held-out covid fixtures."""
    return {s: (_read("slices", s), _read("lung-masks", s) > 0, _read("masks", s) > 0) for s in MEASURED}


@pytest.fixture(scope="module")
def learned(covid):
    """{stem: learned lung mask} from one batched call."""
    stems = sorted(covid)
    masks = segment_lungs([covid[s][0] for s in stems], method="learned")
    return dict(zip(stems, masks))


def test_shipped_weights_small_and_carded():
    assert LUNG_WEIGHTS.is_file()
    assert LUNG_WEIGHTS.stat().st_size < 5_000_000
    card = json.loads(LUNG_WEIGHTS.with_suffix(".json").read_text())
    assert card["weights_file"] == LUNG_WEIGHTS.name
    assert set(card["split"]["heldout_patient_groups"]) == {"coronacases_003", "coronacases_009",
                                                             "radiopaedia_40_86625_0"}
    assert set(card["heldout_metrics"]) >= {"coronacases_003", "coronacases_009", "radiopaedia_40_86625_0", "ALL"}
    assert lung_method() == "learned"


@pytest.mark.parametrize("stem", sorted(MEASURED))
def test_learned_dice_on_heldout_fixtures(covid, learned, stem):
    gray, gt, _ = covid[stem]
    m = learned[stem]
    assert m.dtype == bool and m.shape == gray.shape
    assert _dice(m, gt) >= MEASURED[stem] - MARGIN


def test_learned_mean_dice_beats_classical(covid, learned):
    ours = np.mean([_dice(learned[s], covid[s][1]) for s in MEASURED])
    assert ours >= np.mean(list(MEASURED.values())) - MARGIN
    assert ours > np.mean(list(CLASSICAL.values()))


def test_auto_uses_the_learned_model(covid, learned):
    gray = covid["covid_1000"][0]
    (auto,) = segment_lungs([gray])
    assert np.array_equal(auto, learned["covid_1000"])


def test_fallback_to_classical_without_weights(covid, tmp_path):
    missing = tmp_path / "no-such-lung-weights.h5"
    grays = [covid[s][0] for s in sorted(covid)]
    out = segment_lungs(grays, weights=missing)
    for g, m in zip(grays, out):
        assert np.array_equal(m, lung_mask_slice(g))
    assert lung_method(missing) == "classical"
    with pytest.raises(FileNotFoundError):
        segment_lungs(grays[:1], method="learned", weights=missing)


def test_fallback_on_damaged_weights_warns(covid, tmp_path):
    bad = tmp_path / "damaged.h5"
    bad.write_bytes(b"not an HDF5 file at all")
    gray = covid["covid_1000"][0]
    with pytest.warns(UserWarning, match="lung weights unusable"):
        (m,) = segment_lungs([gray], weights=bad)
    assert np.array_equal(m, lung_mask_slice(gray))


def test_classical_method_never_needs_weights(covid):
    gray = covid["covid_1530"][0]
    (m,) = segment_lungs([gray], method="classical")
    assert np.array_equal(m, lung_mask_slice(gray))


def test_mixed_sizes_and_colour_in_one_batch(covid):
    """Each mask has its slice's own size; resized/non-square/colour copies still find the lungs."""
    gray, gt, _ = covid["covid_1000"]
    tall = cv2.resize(gray, (384, 512), interpolation=cv2.INTER_CUBIC)        # non-square, enlarged, stretched
    small = cv2.resize(gray, (100, 100), interpolation=cv2.INTER_AREA)
    wide = np.zeros((256, 400), np.uint8)                                      # letterboxed already: black sides
    wide[:, 72:328] = gray
    colour = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    batch = [gray, tall, small, wide, colour]
    out = segment_lungs(batch, method="learned", batch_size=2)               # batches cross size boundaries
    assert [m.shape for m in out] == [(256, 256), (512, 384), (100, 100), (256, 400), (256, 256)]
    assert all(m.dtype == bool for m in out)
    ref = MEASURED["covid_1000"]
    big_gt = cv2.resize(gt.astype(np.uint8), (384, 512), interpolation=cv2.INTER_NEAREST) > 0
    small_gt = cv2.resize(gt.astype(np.uint8), (100, 100), interpolation=cv2.INTER_NEAREST) > 0
    assert _dice(out[1], big_gt) >= ref - 3 * MARGIN
    assert _dice(out[2], small_gt) >= ref - 3 * MARGIN
    assert _dice(out[3][:, 72:328], gt) >= ref - MARGIN and not out[3][:, :72].any()
    assert np.array_equal(out[4], out[0])


#: MedSeg stem -> share of its expert infection inside the learned lung mask, measured with the slice turned
#: upright (np.rot90 k=1). MedSeg stores slices turned by 90 degrees; as stored, only 9 % / 43 % is covered.
MEDSEG_UPRIGHT_COVERAGE = {"medseg_5": 0.775, "medseg_20": 0.915}


@pytest.mark.parametrize("stem", sorted(MEDSEG_UPRIGHT_COVERAGE))
def test_medseg_crops_give_a_plausible_mask(stem):
    """MedSeg slices are cropped to the chest (no lung masks exist): upright, the lungs hold most infection."""
    gray = np.ascontiguousarray(np.rot90(_read("slices", stem, ".jpg")))
    inf = np.rot90(_read("masks", stem) > 0)
    (m,) = segment_lungs([gray], method="learned")
    assert m.shape == gray.shape
    assert 0.3 < m.mean() < 0.8                  # the lungs fill much of a chest crop, not all of it
    assert (m & inf).sum() / inf.sum() >= MEDSEG_UPRIGHT_COVERAGE[stem] - 0.05


def test_include_merges_infection(covid, learned):
    for stem, (gray, gt, inf) in covid.items():
        (merged,) = segment_lungs([gray], include=[inf], method="learned")
        plain = learned[stem]
        assert not (plain & ~merged).any()                       # merging only adds
        touching = lung_mask_from_probability(plain.astype(np.float32), include=inf)
        assert np.array_equal(merged, touching)
        assert (merged & inf).sum() >= (plain & inf).sum()
    with pytest.raises(ValueError, match="include has 1 masks for 2 slices"):
        segment_lungs([gray, gray], include=[inf])


def test_edge_cases():
    assert segment_lungs([]) == []
    (blank,) = segment_lungs([np.zeros((64, 80), np.uint8)], method="learned")
    assert blank.shape == (64, 80) and not blank.any()
    with pytest.raises(ValueError, match="unknown lung method"):
        segment_lungs([np.zeros((8, 8), np.uint8)], method="magic")


def test_training_example_equals_serving_input(covid):
    """With augmentation off, a training example is exactly the serving input (and the target is aligned)."""
    from training.train_lung import make_lung_example

    gray, gt, _ = covid["covid_0340"]
    x, y = make_lung_example(gray, gt.astype(np.uint8), None)
    served, _ = prepare_lung_input(gray)
    assert x.shape == (LUNG_INPUT_SIZE, LUNG_INPUT_SIZE)
    assert np.array_equal(x, served)
    up = cv2.resize(y, gt.shape[::-1], interpolation=cv2.INTER_LINEAR) >= 0.5
    assert _dice(up, gt) > 0.97
    # augmented examples stay the same size, in range, and keep most of the lung
    rng = np.random.default_rng(0)
    for _ in range(4):
        xa, ya = make_lung_example(gray, gt.astype(np.uint8), rng)
        assert xa.shape == ya.shape == (LUNG_INPUT_SIZE, LUNG_INPUT_SIZE)
        assert 0.0 <= xa.min() and xa.max() <= 1.0 and ya.sum() > 0.5 * y.sum()


def test_model_is_cached():
    assert get_lung_model() is get_lung_model()
