"""`covidseg predict` on volumes: a shuffled DICOM series and a NIfTI volume round-trip with their geometry.

The stand-in threshold model (see conftest) segments the bright synthetic discs, so the mask must land exactly
on the disc voxels of the *input* grid: that checks slice sorting, reorientation and the written affine.
"""
from __future__ import annotations

import json

import cv2
import nibabel as nib
import numpy as np
import pytest

from cli import main
from cli import model as model_commands
from shared.core.metrics import dice_iou_counts

from .conftest import FIXTURES
from .helpers import BLOB_HU, blob_volume, write_dicom_series, write_nifti


@pytest.fixture
def use_threshold_model(monkeypatch, threshold_segmenter):
    monkeypatch.setattr(model_commands, "make_segmenter", lambda args: threshold_segmenter)


def _png_count(path):
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert set(np.unique(m)) <= {0, 255}
    return int(np.count_nonzero(m))


def test_dicom_series_roundtrip(tmp_path, use_threshold_model, capsys):
    hu, centres = blob_volume((5, 40, 48))
    write_dicom_series(tmp_path / "series", hu, spacing=(0.8, 0.7), dz=2.5, origin=(-20.0, -15.0, 40.0), seed=5)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "series"), "--out", str(out)]) == 0, capsys.readouterr().err
    img = nib.load(str(out / "series" / "mask.nii.gz"))
    data = np.asarray(img.dataobj)
    expected_affine = np.array([[-0.7, 0, 0, 20.0], [0, -0.8, 0, 15.0], [0, 0, 2.5, 40.0], [0, 0, 0, 1]])
    assert data.shape == (48, 40, 5) and np.allclose(img.affine, expected_affine)
    truth = (hu > 0).transpose(2, 1, 0)  # (col, row, slice) like the NIfTI array
    assert dice_iou_counts(data > 0, truth)[0] > 0.9
    for k, c in enumerate(centres):  # each disc sits at its slice's DICOM position
        if c is None:
            assert data[:, :, k].sum() == 0
            continue
        cols, rows = np.nonzero(data[:, :, k])
        assert abs(rows.mean() - c[0]) < 0.5 and abs(cols.mean() - c[1]) < 0.5
        world = img.affine @ [cols.mean(), rows.mean(), k, 1]
        lps = np.array([-20.0 + c[1] * 0.7, -15.0 + c[0] * 0.8, 40.0 + 2.5 * k])
        assert np.allclose(world[:3], lps * [-1, -1, 1], atol=0.5)
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["kind"] == "volume" and res["infected_voxels"] == int(data.sum())
    assert sum(_png_count(out / "series" / f"slice_{k:04d}" / "mask.png") for k in range(5)) == int(data.sum())
    assert [s["infected_pixels"] for s in res["slices"]] == [int(data[:, :, k].sum()) for k in range(5)]
    assert res["infected_volume_ml"] == pytest.approx(data.sum() * 0.7 * 0.8 * 2.5 / 1000)


def test_dicom_series_gets_a_dicom_seg_on_the_source_slices(tmp_path, use_threshold_model, capsys):
    """mask.seg.dcm references every source slice by UID in spatial order (files written shuffled), shares the
    study, frame of reference and patient, and holds exactly the NIfTI mask, frame by frame."""
    import pydicom

    from shared.core.dicom_seg import INFECTION, read_dicom_seg_masks

    hu, _ = blob_volume((5, 40, 48))
    paths = write_dicom_series(tmp_path / "series", hu, seed=3)   # no PatientBirthDate etc.: Type 2 filled in
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "series"), "--out", str(out), "--no-slice-images"]) == 0, \
        capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["mask_dicom_seg"] == str(out / "series" / "mask.seg.dcm") and "dicom_seg_error" not in res
    nifti = np.asarray(nib.load(str(out / "series" / "mask.nii.gz")).dataobj).transpose(2, 1, 0)  # (z, row, col)
    masks, uids = read_dicom_seg_masks(out / "series" / "mask.seg.dcm")
    sources = sorted((pydicom.dcmread(str(p)) for p in paths), key=lambda d: float(d.ImagePositionPatient[2]))
    assert uids == [d.SOPInstanceUID for d in sources]
    assert list(masks) == [INFECTION.label] and nifti.sum() > 0
    assert np.array_equal(masks[INFECTION.label], nifti)
    seg = pydicom.dcmread(str(out / "series" / "mask.seg.dcm"))
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert seg[key].value == sources[0][key].value, key
    assert int(seg.NumberOfFrames) == int((nifti.reshape(5, -1).max(axis=1) > 0).sum())   # empty frames omitted

    # opting out, and NIfTI input (no UIDs to reference): no SEG
    assert main(["predict", str(tmp_path / "series"), "--out", str(tmp_path / "o2"), "--no-slice-images",
                 "--no-dicom-seg"]) == 0
    assert not (tmp_path / "o2" / "series" / "mask.seg.dcm").exists()
    assert json.loads((tmp_path / "o2" / "results.json").read_text())["results"][0]["mask_dicom_seg"] is None


def test_dicom_seg_failure_is_a_warning_not_a_lost_result(tmp_path, use_threshold_model, capsys):
    """A series highdicom cannot describe (no FrameOfReferenceUID) still gets its NIfTI mask and results."""
    import pydicom

    hu, _ = blob_volume((3, 32, 32))
    for p in write_dicom_series(tmp_path / "s", hu):
        ds = pydicom.dcmread(str(p))
        del ds.FrameOfReferenceUID
        ds.save_as(p, enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "s"), "--out", str(out), "--no-slice-images"]) == 0
    err = capsys.readouterr().err
    assert "DICOM SEG not written" in err and "Traceback" not in err
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["mask_dicom_seg"] is None and res["dicom_seg_error"]
    assert (out / "s" / "mask.nii.gz").is_file() and not (out / "s" / "mask.seg.dcm").exists()


def test_nifti_roundtrip_keeps_grid_and_affine(tmp_path, use_threshold_model, capsys):
    hu, centres = blob_volume((4, 40, 48))
    # source array order (j = anterior-posterior flipped, i = left-right, k): a permuted + flipped grid
    data = np.ascontiguousarray(hu.transpose(1, 2, 0)[::-1])  # (rows reversed, cols, slices)
    affine = np.array([[0, -0.75, 0, 30], [0.75, 0, 0, -40], [0, 0, 3.0, -60], [0, 0, 0, 1]], float)
    src = write_nifti(tmp_path / "ct.nii.gz", data.astype(np.int16), affine)
    out = tmp_path / "out"
    assert main(["predict", str(src), "--out", str(out), "--no-slice-images"]) == 0, capsys.readouterr().err
    mimg = nib.load(str(out / "ct" / "mask.nii.gz"))
    mask = np.asarray(mimg.dataobj)
    assert mask.shape == data.shape and np.allclose(mimg.affine, affine)
    assert np.array_equal(mimg.header.get_sform(), nib.load(str(src)).header.get_sform())
    truth = data == BLOB_HU
    assert dice_iou_counts(mask > 0, truth)[0] > 0.9
    assert not (out / "ct" / "slice_0000").exists()
    res = json.loads((out / "results.json").read_text())["results"][0]
    assert res["infected_voxels"] == int(mask.sum()) and res["shape"] == list(data.shape)
    assert res["mask_dicom_seg"] is None and not (out / "ct" / "mask.seg.dcm").exists()


def test_real_model_on_dicom_and_slices(tmp_path, real_segmenter, capsys):
    """End to end with the shipped weights: outputs exist and every count agrees (no trained model assumed)."""
    hu, _ = blob_volume((3, 32, 32))
    write_dicom_series(tmp_path / "s", hu)
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "s"), str(FIXTURES / "slices" / "medseg_5.jpg"), "--out", str(out),
               "--backend", "fp32"])
    assert rc == 0, capsys.readouterr().err
    res = {r["name"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert set(res) == {"s", "medseg_5"}
    m = cv2.imread(str(out / "medseg_5" / "mask.png"), cv2.IMREAD_GRAYSCALE)
    ov = cv2.imread(str(out / "medseg_5" / "overlay.png"))
    assert m.shape == (433, 385) and ov.shape == (433, 385, 3)
    assert res["medseg_5"]["infected_fraction"] == pytest.approx(np.count_nonzero(m) / m.size)
    vol = np.asarray(nib.load(str(out / "s" / "mask.nii.gz")).dataobj)
    assert vol.shape == (32, 32, 3) and res["s"]["infected_voxels"] == int(vol.sum())
