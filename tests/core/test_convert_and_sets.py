"""`covidseg convert` (volumes -> slice PNGs that `train --images/--masks` reads) and training.validation_sets."""
from __future__ import annotations

import csv
import random

import cv2
import numpy as np
import pytest

from cli import main
from training import data
from training.train import _generic_samples
from training.validation_sets import main as sets_main

from .helpers import blob_volume, write_dicom_series, write_nifti


@pytest.fixture
def volume_pair(tmp_path):
    hu, _ = blob_volume((6, 40, 48))
    affine = np.diag([0.7, 0.8, 2.5, 1.0])  # RAS grid: display needs a flip of i and j
    ct = write_nifti(tmp_path / "case_01.nii.gz", hu.transpose(2, 1, 0).astype(np.int16), affine)
    mask = write_nifti(tmp_path / "case_01_mask.nii.gz", (hu > 0).transpose(2, 1, 0).astype(np.uint8), affine)
    return ct, mask, hu


def test_convert_with_masks_selection_and_resize(tmp_path, volume_pair, capsys):
    ct, mask, hu = volume_pair
    out = tmp_path / "ds"
    rc = main(["convert", str(ct), "--masks", str(mask), "--out", str(out), "--only-with-mask", "--every", "2",
               "--range", "1:6", "--size", "64"])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in (out / "images").iterdir())
    # range 1..5, every 2nd -> 1, 3, 5; all have a disc (slice 0 has none)
    assert names == ["case-01_0001.png", "case-01_0003.png", "case-01_0005.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == names
    img = cv2.imread(str(out / "images" / names[0]), cv2.IMREAD_GRAYSCALE)
    m = cv2.imread(str(out / "masks" / names[0]), cv2.IMREAD_GRAYSCALE)
    assert img.shape == m.shape == (64, 64) and set(np.unique(m)) == {0, 255}
    # the mask sits on the bright disc of its own image
    assert img[m > 0].mean() > 200 and img[m == 0].mean() < 80
    rows = list(csv.DictReader(open(out / "slices.csv")))
    assert [int(r["slice_index"]) for r in rows] == [1, 3, 5]
    # the layout `covidseg train --images --masks` reads
    samples = _generic_samples(out / "images", out / "masks")
    assert len(samples) == 3 and {s.group for s in samples} == {"case-01"}


def test_convert_dicom_without_masks_keeps_size_and_window(tmp_path, capsys):
    hu, _ = blob_volume((3, 30, 34))
    write_dicom_series(tmp_path / "ser", hu)
    out = tmp_path / "o"
    assert main(["convert", str(tmp_path / "ser"), "--out", str(out)]) == 0, capsys.readouterr().err
    files = sorted((out / "images").iterdir())
    assert len(files) == 3 and not (out / "masks").exists()
    img = cv2.imread(str(files[1]), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (30, 34) and set(np.unique(img)) == {60, 247}  # -1000 HU -> 59.5, +100 HU -> 246.5 (rounded half up)


def test_convert_rejects_mask_of_another_shape(tmp_path, volume_pair, capsys):
    ct, _, hu = volume_pair
    other = write_nifti(tmp_path / "small.nii.gz", np.zeros((10, 10, 6), np.uint8), np.eye(4))
    rc = main(["convert", str(ct), "--masks", str(other), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "shape" in err


def _fake_roots(tmp):
    covid, medseg = tmp / "covid", tmp / "medseg"
    for d in (covid / "images", covid / "masks", medseg / "images", medseg / "masks"):
        d.mkdir(parents=True)
    groups = ["coronacases_001", "coronacases_003", "coronacases_009", "radiopaedia_40_86625_0", "radiopaedia_7"]
    with open(covid / "slice_to_volume.csv", "w") as f:
        f.write("file,inferred_volume,inferred_patient_group\n")
        for n in range(10):
            name = f"{n:04d}.png"
            cv2.imwrite(str(covid / "images" / name), np.full((8, 8), n, np.uint8))
            cv2.imwrite(str(covid / "masks" / name), np.zeros((8, 8), np.uint8))
            f.write(f"{name},{groups[n % 5]},{groups[n % 5]}\n")
    for n in range(1, 21):
        cv2.imwrite(str(medseg / "images" / f"{n}.jpg"), np.full((8, 8), n, np.uint8))
        cv2.imwrite(str(medseg / "masks" / f"{n}.png"), np.zeros((8, 8), np.uint8))
    return covid, medseg


def test_validation_sets_are_the_held_out_split(tmp_path, capsys):
    covid, medseg = _fake_roots(tmp_path)
    out = tmp_path / "V"
    assert sets_main(["--covid-root", str(covid), "--medseg-root", str(medseg), "--out", str(out)]) == 0
    got_c = sorted(p.name for p in (out / "covid" / "images").iterdir())
    # groups 1..3 of 5 are held out (coronacases_003, _009, radiopaedia_40_86625_0): files n % 5 in {1, 2, 3}
    assert got_c == [f"{n:04d}.png" for n in range(10) if n % 5 in (1, 2, 3)]
    assert sorted(p.name for p in (out / "covid" / "masks").iterdir()) == got_c
    held = sorted(random.Random(1234).sample(range(1, 21), 15))
    assert sorted(int(p.stem) for p in (out / "medseg" / "images").iterdir()) == held
    assert sorted(int(p.stem) for p in (out / "medseg" / "masks").iterdir()) == held
    _, _, val_m = data.split(None, medseg)
    assert len(val_m) == 15
    # evaluate can run on the written folders (pairs by stem across .jpg/.png)
    rc = main(["evaluate", "--masks", str(out / "medseg" / "masks"), "--predictions", str(out / "medseg" / "masks"),
               "--json", str(tmp_path / "e.json")])
    assert rc == 0


def test_validation_sets_bad_root(tmp_path, capsys):
    assert sets_main(["--covid-root", str(tmp_path / "nope"), "--out", str(tmp_path / "V")]) == 2
    assert "error:" in capsys.readouterr().err
