"""shared.core.render and shared.core.metrics."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from shared.core import metrics, render


def _decode(png: bytes, flag=cv2.IMREAD_UNCHANGED):
    return cv2.imdecode(np.frombuffer(png, np.uint8), flag)


@pytest.fixture
def prob():
    p = np.zeros((30, 40), np.float32)
    p[5:15, 10:30] = 0.9   # 200 pixels >= 0.5
    p[20:25, 0:4] = 0.5    # 20 pixels exactly at the threshold count as infected
    p[26:28, 0:4] = 0.49   # 8 pixels just below
    return p


def test_mask_and_probability_png(prob):
    m = _decode(render.mask_png(prob))
    assert m.dtype == np.uint8 and m.shape == prob.shape
    assert set(np.unique(m)) == {0, 255} and np.count_nonzero(m) == 220
    p8 = _decode(render.probability_png(prob))
    assert p8[6, 11] == 230 and p8[21, 1] == 128 and p8[26, 1] == 125 and p8[0, 0] == 0  # round(p * 255)
    assert render.infected_fraction(prob) == pytest.approx(220 / 1200)
    assert render.infected_fraction(prob, threshold=0.95) == 0.0


def test_overlay_colours_only_above_floor(prob):
    gray = np.full((60, 80), 100, np.uint8)  # slice twice the size of the map: map is resized to the slice
    ov = _decode(render.overlay_png(gray, prob))
    assert ov.shape == (60, 80, 3)
    assert (ov[0, 0] == [100, 100, 100]).all()          # background: untouched gray
    hot = ov[20, 40].astype(int)                          # inside the 0.9 region: red-ish JET colour blended in
    assert hot[2] > hot[0] + 50
    assert render.overlay_image(gray, np.zeros_like(prob)).tolist() == cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).tolist()


def test_confusion_and_aggregate_by_hand():
    a_pred = np.zeros((4, 4), bool); a_pred[0, :] = True
    a_true = np.zeros((4, 4), bool); a_true[:2, :2] = True
    rec_a = metrics.image_scores("a", a_pred, a_true)
    assert (rec_a["tp"], rec_a["fp"], rec_a["fn"], rec_a["tn"]) == (2, 2, 2, 10)
    assert rec_a["dice"] == 0.5 and rec_a["iou"] == pytest.approx(1 / 3)
    rec_b = metrics.image_scores("b", np.zeros((2, 2)), np.zeros((2, 2)))
    assert rec_b["dice"] == 1.0 and rec_b["sensitivity"] is None and rec_b["specificity"] == 1.0
    agg = metrics.aggregate([rec_a, rec_b])
    assert agg["mean_dice"] == 0.75 and agg["global_dice"] == 0.5
    assert agg["sensitivity"] == 0.5 and agg["specificity"] == pytest.approx(14 / 16)
    with pytest.raises(ValueError, match="shape"):
        metrics.confusion_counts(np.zeros((2, 2)), np.zeros((3, 2)))


def test_infection_size_groups_bins_by_annotated_share():
    """Bins come from the annotation (tp + fn), not the prediction; edges belong to the bin above."""
    def rec(name, infected, predicted=0, n=10_000):
        t = np.zeros(n, bool); t[:infected] = True
        p = np.zeros(n, bool); p[n - predicted:] = True
        return metrics.image_scores(name, p, t)

    recs = [rec("none", 0, predicted=500), rec("tiny", 74), rec("edge1", 75), rec("mid", 749), rec("edge2", 750),
            rec("big", 9000, predicted=9000)]
    bins = metrics.infection_size_groups(recs)
    assert bins == {"none": "0: none", "tiny": "1: < 0.75 %", "edge1": "2: 0.75–7.5 %", "mid": "2: 0.75–7.5 %",
                    "edge2": "3: ≥ 7.5 %", "big": "3: ≥ 7.5 %"}
    by = metrics.aggregate_groups(recs, bins)
    assert list(by) == ["0: none", "1: < 0.75 %", "2: 0.75–7.5 %", "3: ≥ 7.5 %"]
    assert by["0: none"]["mean_dice"] == 0.0 and by["2: 0.75–7.5 %"]["n_images"] == 2
    assert by["3: ≥ 7.5 %"]["mean_dice"] == pytest.approx((0 + 2 * 8000 / 18000) / 2)
    assert metrics.infection_size_groups(recs, edges=(0.5,))["big"] == "2: ≥ 50 %"
