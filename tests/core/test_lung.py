"""shared.core.lung: classical lung masks on the committed real fixtures and on a synthetic HU volume.

Thresholds are the values measured when the module was tuned (on the training patients of covid19-ct-seg-256;
the fixtures are held-out slices) minus a margin of 0.03. Only tests/fixtures is read, never /work/shared.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from shared.core.lung import lung_mask_hu, lung_mask_slice, split_sides

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REPO = FIXTURES.parent.parent
MARGIN = 0.03
#: stem -> (measured lung Dice, measured lung Dice with the expert infection merged via include=)
MEASURED = {
    "covid_0300": (0.783, 0.813),   # coronacases_003, lung bases with dense dependent consolidation
    "covid_0340": (0.824, 0.976),   # coronacases_003, large dependent consolidation (missed without include=)
    "covid_1000": (0.932, 0.958),   # coronacases_009
    "covid_1530": (0.931, 0.944),   # radiopaedia_40_86625_0
}


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _read(kind: str, stem: str) -> np.ndarray:
    img = cv2.imread(str(FIXTURES / kind / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f"missing fixture {kind}/{stem}.png"
    return img


@pytest.fixture(scope="module")
def lung_fixtures():
    """{stem: (gray, expert lung mask, expert infection mask, our lung mask)}."""
    out = {}
    for stem in MEASURED:
        gray = _read("slices", stem)
        out[stem] = (gray, _read("lung-masks", stem) > 0, _read("masks", stem) > 0, lung_mask_slice(gray))
    return out


@pytest.mark.parametrize("stem", sorted(MEASURED))
def test_slice_dice_on_real_fixtures(lung_fixtures, stem):
    gray, gt, _, pred = lung_fixtures[stem]
    assert pred.dtype == bool and pred.shape == gray.shape
    assert _dice(pred, gt) >= MEASURED[stem][0] - MARGIN


def test_slice_mean_dice(lung_fixtures):
    mean = np.mean([_dice(p, gt) for _, gt, _, p in lung_fixtures.values()])
    assert mean >= np.mean([v[0] for v in MEASURED.values()]) - MARGIN


@pytest.mark.parametrize("stem", sorted(MEASURED))
def test_include_merges_infection(lung_fixtures, stem):
    """With the infection mask passed as include=, lesions are inside the lung and the lung Dice does not drop."""
    gray, gt, inf, pred = lung_fixtures[stem]
    merged = lung_mask_slice(gray, include=inf)
    assert (merged & inf).sum() / inf.sum() >= 0.98
    assert not (pred & ~merged).any()                      # merging only adds
    assert _dice(merged, gt) >= MEASURED[stem][1] - MARGIN


def test_slice_any_size_and_colour(lung_fixtures):
    gray, gt, _, pred = lung_fixtures["covid_1000"]
    big = cv2.resize(gray, (384, 512), interpolation=cv2.INTER_CUBIC)       # non-square, enlarged
    big_gt = cv2.resize(gt.astype(np.uint8), (384, 512), interpolation=cv2.INTER_NEAREST) > 0
    m = lung_mask_slice(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    assert m.shape == (512, 384)
    assert _dice(m, big_gt) >= MEASURED["covid_1000"][0] - 2 * MARGIN
    assert not lung_mask_slice(np.zeros((64, 64), np.uint8)).any()           # blank image: no lung


# ------------------------------------------------------------------------------------------ synthetic HU volume


def _ellipse(shape, cy, cx, ry, rx):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


@pytest.fixture(scope="module")
def phantom():
    """Outside air -1000 HU, body ellipse +40, two lungs -850, a -100 HU lesion inside the image-right lung and a
    subpleural one against the image-left lung's lateral wall, a trachea (-1000) above the lungs; noise 25 HU."""
    shape = (192, 224)
    body = _ellipse(shape, 96, 112, 70, 100)
    lung_l, lung_r = _ellipse(shape, 92, 70, 48, 34), _ellipse(shape, 92, 154, 48, 34)
    lesion_in = _ellipse(shape, 88, 154, 10, 10)
    lesion_wall = _ellipse(shape, 100, 40, 9, 9) & lung_l
    trachea = _ellipse(shape, 46, 112, 7, 7)
    sl = np.where(body, 40.0, -1000.0)
    sl = np.where(lung_l | lung_r, -850.0, sl)
    sl = np.where(lesion_in | lesion_wall, -100.0, sl)
    sl = np.where(trachea, -1000.0, sl)
    vol = np.repeat(sl[None], 5, axis=0).astype(np.float32)
    vol += np.random.default_rng(0).normal(0.0, 25.0, vol.shape).astype(np.float32)
    return {"vol": vol, "body": body, "lung_l": lung_l, "lung_r": lung_r, "lesion_in": lesion_in,
            "lesion_wall": lesion_wall, "trachea": trachea}


def test_hu_volume_recovers_lungs_and_lesions(phantom):
    ph = phantom
    m = lung_mask_hu(ph["vol"], spacing=(2.5, 1.5, 1.5))
    assert m.dtype == bool and m.shape == ph["vol"].shape
    lungs = ph["lung_l"] | ph["lung_r"]
    for k in range(m.shape[0]):
        assert _dice(m[k], lungs) >= 0.95
        assert (m[k] & ph["lesion_in"]).sum() == ph["lesion_in"].sum()          # lesion inside the lung: all of it
        assert (m[k] & ph["lesion_wall"]).sum() >= 0.9 * ph["lesion_wall"].sum()  # lesion against the wall
        assert not (m[k] & ph["trachea"]).any()                                  # trachea removed
        assert not (m[k] & ~ph["body"]).any()                                    # no outside air


def test_hu_without_spacing_and_single_slice(phantom):
    lungs = phantom["lung_l"] | phantom["lung_r"]
    m2d = lung_mask_hu(phantom["vol"][0])                    # 2-D input, no spacing (assumed ~360 mm FOV)
    assert m2d.shape == lungs.shape and _dice(m2d, lungs) >= 0.95
    assert not lung_mask_hu(np.full((2, 64, 64), -1000.0)).any()   # only air: no lung
    with pytest.raises(ValueError):
        lung_mask_hu(np.zeros((2, 2, 2, 2)))


def test_trachea_connected_to_a_lung_in_one_slice_is_kept_only_there(phantom):
    vol = phantom["vol"].copy()
    vol[0, 44:49, 60:112] = -1000.0        # a "bronchus" joining the trachea to the image-left lung in slice 0
    m = lung_mask_hu(vol, spacing=(2.5, 1.5, 1.5))
    assert not (m[1:] & phantom["trachea"]).any()


# ------------------------------------------------------------------------------------------ sides, imports


def test_split_sides(phantom):
    lung_l, lung_r = phantom["lung_l"], phantom["lung_r"]
    left, right = split_sides(lung_l | lung_r)
    assert (left == lung_l).all() and (right == lung_r).all()
    # lungs touching at an anterior junction: one component, cut at its waist
    joined = lung_l | lung_r | _ellipse(lung_l.shape, 60, 112, 3, 12)
    left, right = split_sides(joined)
    assert not (left & right).any() and ((left | right) == joined).all()
    assert _dice(left, lung_l) >= 0.97 and _dice(right, lung_r) >= 0.97
    # 3-D, and a lone lung goes to the side of the given midline
    l3, r3 = split_sides(np.stack([lung_l | lung_r, lung_r]))
    assert (r3[1] == lung_r).all() and not l3[1].any()
    l1, r1 = split_sides(lung_r, midline=112)
    assert not l1.any() and (r1 == lung_r).all()
    e1, e2 = split_sides(np.zeros((8, 8), bool))
    assert not e1.any() and not e2.any()


def test_lung_module_stays_light():
    code = ("import sys, shared.core.lung; heavy = [m for m in ('tensorflow', 'flask', 'celery', 'scipy', 'skimage') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
