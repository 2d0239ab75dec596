"""`covidseg evaluate --predictions`: exact, hand-computed numbers; report; pairing by stem."""
from __future__ import annotations

import json
from fractions import Fraction as F

import cv2
import numpy as np
import pytest

from cli import main


def _write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


@pytest.fixture
def case(tmp_path):
    m, p, im = tmp_path / "masks", tmp_path / "preds", tmp_path / "images"
    # a: mask = top-left 2x2, prediction = top row            -> tp 2, fp 2, fn 2, tn 10
    ma = np.zeros((4, 4), np.uint8); ma[:2, :2] = 255
    pa = np.zeros((4, 4), np.uint8); pa[0, :] = 255
    # b: both empty                                             -> tn 16, Dice = IoU = 1
    mb = np.zeros((4, 4), np.uint8); pb = np.zeros((4, 4), np.uint8)
    # c: probability PNG, 128/255 >= 0.5 on the mask column, 127/255 < 0.5 elsewhere -> tp 4, tn 12
    mc = np.zeros((4, 4), np.uint8); mc[:, 1] = 1               # mask value 1 (> 0) is positive too
    pc = np.full((4, 4), 127, np.uint8); pc[:, 1] = 128
    # d: 4x4 all-255 prediction for an 8x8 mask with 16 positives: resized to 8x8 (all 1.0) -> tp 16, fp 48
    md = np.zeros((8, 8), np.uint8); md[2:6, 2:6] = 255
    pd = np.full((4, 4), 255, np.uint8)
    for name, mask, pred in (("a", ma, pa), ("b", mb, pb), ("c", mc, pc), ("d", md, pd)):
        _write(m / f"{name}.png", mask)
        _write(p / f"{name}.png", pred)
        _write(im / f"{name}.jpg", np.full(mask.shape, 90, np.uint8))  # any extension pairs by stem
    return tmp_path


def test_hand_computed_metrics(case, capsys):
    out = case / "eval.json"
    rc = main(["evaluate", "--images", str(case / "images"), "--masks", str(case / "masks"),
               "--predictions", str(case / "preds"), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert set(r) == {"n_images", "mean_dice", "global_dice", "mean_iou", "global_iou", "sensitivity",
                      "specificity", "per_image", "per_infection_size"}
    tp, fp, fn, tn = 2 + 0 + 4 + 16, 2 + 0 + 0 + 48, 2 + 0 + 0 + 0, 10 + 16 + 12 + 0
    expected = {
        "n_images": 4,
        "mean_dice": (F(1, 2) + 1 + 1 + F(32, 80)) / 4,
        "global_dice": F(2 * tp, 2 * tp + fp + fn),
        "mean_iou": (F(1, 3) + 1 + 1 + F(16, 64)) / 4,
        "global_iou": F(tp, tp + fp + fn),
        "sensitivity": F(tp, tp + fn),
        "specificity": F(tn, tn + fp),
    }
    for k, v in expected.items():
        assert r[k] == pytest.approx(float(v), rel=1e-12, abs=0), k
    per = {x["name"]: x for x in r["per_image"]}
    assert [(per[n]["tp"], per[n]["fp"], per[n]["fn"], per[n]["tn"]) for n in "abcd"] == \
        [(2, 2, 2, 10), (0, 0, 0, 16), (4, 0, 0, 12), (16, 48, 0, 0)]
    assert per["b"]["dice"] == 1.0 and per["d"]["dice"] == pytest.approx(0.4)


def test_report_written(case, capsys):
    rep = case / "report"
    rc = main(["evaluate", "--masks", str(case / "masks"), "--images", str(case / "images"),
               "--predictions", str(case / "preds"), "--report", str(rep)])
    assert rc == 0, capsys.readouterr().err
    md = (rep / "report.md").read_text()
    assert "| mean_dice | 0.7250 |" in md and "cases.png" in md
    grid = cv2.imread(str(rep / "cases.png"))
    assert grid is not None and grid.shape[0] > 200


def test_unpaired_files_are_skipped_with_warning(case, capsys):
    _write(case / "preds" / "extra.png", np.zeros((4, 4), np.uint8))
    rc = main(["evaluate", "--masks", str(case / "masks"), "--predictions", str(case / "preds"),
               "--json", str(case / "e.json")])
    captured = capsys.readouterr()
    assert rc == 0 and "without a partner" in captured.err
    assert json.loads((case / "e.json").read_text())["n_images"] == 4


def test_per_group_metrics(case, capsys):
    """--groups: `aggregate` per group, from a manifest.csv-style file (names with extensions, any order)."""
    groups = case / "manifest.csv"
    groups.write_text("file,mask,group\nd.png,d.png,p2\na.png,a.png,p1\nb.jpg,b.png,p1\n")  # c: not listed
    out, rep = case / "g.json", case / "rep"
    rc = main(["evaluate", "--masks", str(case / "masks"), "--predictions", str(case / "preds"),
               "--groups", str(groups), "--json", str(out), "--report", str(rep)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "1 image(s) not in" in captured.err and "ungrouped" in captured.err
    g = json.loads(out.read_text())["per_group"]
    assert list(g) == ["p1", "p2", "ungrouped"]
    # p1 = a + b: tp 2, fp 2, fn 2, tn 26
    assert g["p1"]["n_images"] == 2
    assert g["p1"]["mean_dice"] == pytest.approx((0.5 + 1) / 2)
    assert g["p1"]["global_dice"] == pytest.approx(4 / 8)
    assert g["p1"]["mean_iou"] == pytest.approx((1 / 3 + 1) / 2)
    assert g["p1"]["sensitivity"] == pytest.approx(2 / 4) and g["p1"]["specificity"] == pytest.approx(26 / 28)
    assert g["p2"] == pytest.approx({"n_images": 1, "mean_dice": 0.4, "global_dice": 0.4, "mean_iou": 0.25,
                                     "global_iou": 0.25, "sensitivity": 1.0, "specificity": 0.0})
    assert g["ungrouped"]["n_images"] == 1 and g["ungrouped"]["mean_dice"] == 1.0
    assert "| p1 | 2 | 0.7500 | 0.5000 |" in captured.out
    assert "## Per group" in (rep / "report.md").read_text()
    # every image here is >= 7.5 % infected except b (none): the size bins of the same records
    sizes = json.loads(out.read_text())["per_infection_size"]
    assert {k: v["n_images"] for k, v in sizes.items()} == {"0: none": 1, "3: ≥ 7.5 %": 3}
    assert sizes["3: ≥ 7.5 %"]["mean_dice"] == pytest.approx((0.5 + 1.0 + 0.4) / 3)
    assert "| 3: ≥ 7.5 % | 3 |" in captured.out and "## By infection size" in (rep / "report.md").read_text()


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("file,patient\na.png,x\n", "needs a 'group' column"),
    ("group\nx\n", "needs a 'group' column"),
    ("", "no header"),
])
def test_bad_groups_file(case, capsys, content, message):
    groups = case / "groups.csv"
    if content is not None:
        groups.write_text(content)
    rc = main(["evaluate", "--masks", str(case / "masks"), "--predictions", str(case / "preds"),
               "--groups", str(groups)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --groups") and message in err
