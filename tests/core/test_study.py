"""shared.core.study and `covidseg study`: whole studies built from the real fixture slices, the shipped model.

Volumes are stacks of the four real covid19-ct-seg fixture slices (256x256, 8-bit) turned into Hounsfield units
through the inverse of the lung window, written as a DICOM series (pydicom) or NIfTI (nibabel) with known
spacing and orientation. The stacks are palindromes, so a series read in the opposite order gives the model the
very same batches.
"""
from __future__ import annotations

import gzip
import io
import json
import random
import zipfile

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from shared.core import study
from cli import main
from shared.core.metrics import dice_iou_counts
from shared.core.study import StudyCancelled, StudyError

from .conftest import FIXTURES
from .helpers import write_dicom_series, write_nifti

STEMS = ("covid_0340", "covid_1000", "covid_0300", "covid_1530")
SPACING = (0.75, 0.7)          # (row, column) mm: different, so a swap would show
DZ = 5.0
ORIGIN = (-90.0, -110.0, 40.0)
PATIENT = {"PatientName": "Doe^John", "PatientID": "SYN001", "PatientBirthDate": "19500101",
           "InstitutionName": "General Hospital Zurich", "AccessionNumber": "ACC778899",
           "ReferringPhysicianName": "House^Gregory"}
SECRETS = [b"Doe^John", b"SYN001", b"19500101", b"General Hospital", b"ACC778899", b"House^Gregory",
           b"private secret"]


def real_hu(stems=STEMS, palindrome=True) -> np.ndarray:
    """HU stack (z, 256, 256) of the fixture slices; lung-windowing it gives the slices back."""
    grays = [cv2.imread(str(FIXTURES / "slices" / f"{s}.png"), cv2.IMREAD_GRAYSCALE) for s in stems]
    seq = grays + grays[::-1] if palindrome else grays
    return np.round(np.stack(seq).astype(np.float32) / 255.0 * 1500.0 - 1350.0).astype(np.int16)


def dicom_files(folder, hu, seed=0, tamper=None, **kw) -> list[tuple[str, bytes]]:
    """A CT series as upload pairs (file order shuffled by the helper), patient data and a private tag added;
    `tamper(k_position, ds)` edits a file's dataset (k = position index)."""
    kw = {"spacing": SPACING, "dz": DZ, "origin": ORIGIN, "intercept": -2048.0, **kw}
    paths = write_dicom_series(folder, hu, seed=seed, **kw)
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        for key, value in PATIENT.items():
            setattr(ds, key, value)
        block = ds.private_block(0x0011, "ACME secrets", create=True)
        block.add_new(0x01, "LO", "private secret")
        k = int(round((float(ds.ImagePositionPatient[2]) - kw["origin"][2]) / kw["dz"]))
        if tamper is not None:
            tamper(k, ds)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((p.name, buf.getvalue()))
    return out


def expected_affine(spacing=SPACING, dz=DZ, origin=ORIGIN) -> np.ndarray:
    """Display grid (col, row, slice) -> RAS for IOP [1,0,0,0,1,0]: LPS x/y negated."""
    return np.array([[-spacing[1], 0, 0, -origin[0]], [0, -spacing[0], 0, -origin[1]], [0, 0, dz, origin[2]],
                     [0, 0, 0, 1]])


def outputs_of(volume, analysis) -> dict[str, tuple[bytes, str]]:
    return {name: (data, ctype) for name, data, ctype in study.study_outputs(volume, analysis)}


def nifti_from_bytes(data: bytes):
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def zip_bytes(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory, real_segmenter):
    """8-slice DICOM series -> unpacked, loaded, analysed (batch 4) with the shipped model, outputs rendered."""
    root = tmp_path_factory.mktemp("dicom-case")
    hu = real_hu()
    files = dicom_files(root / "src", hu, seed=1)
    meta = study.unpack_study_upload(files, root / "norm", salt="test-salt")
    volume = study.load_study(root / "norm")
    calls = []
    analysis = study.analyse_study(volume, real_segmenter, batch_size=4, progress=lambda d, n: calls.append((d, n)))
    return {"root": root, "hu": hu, "files": files, "meta": meta, "volume": volume, "analysis": analysis,
            "calls": calls, "outputs": outputs_of(volume, analysis)}


# ---------------------------------------------------------------------------------------------------- DICOM
def test_dicom_study_geometry_and_measures(dicom_case):
    vol, a, out = dicom_case["volume"], dicom_case["analysis"], dicom_case["outputs"]
    assert vol.kind == "dicom" and vol.is_hu and vol.slices.shape == (8, 256, 256)
    assert np.array_equal(vol.slices, dicom_case["hu"].astype(np.float32))  # sorted by position, HU exact
    assert dicom_case["meta"] == {**dicom_case["meta"], "format": "dicom", "modality": "CT", "n_slices": 8,
                                  "shape": [8, 256, 256], "spacing": [DZ, SPACING[0], SPACING[1]],
                                  "orientation": "LPS", "series_count": 1, "n_files": 8, "skipped_files": 0,
                                  "deidentified": True}
    mask_img = nifti_from_bytes(out["mask.nii.gz"][0])
    lung_img = nifti_from_bytes(out["lung_mask.nii.gz"][0])
    for img in (mask_img, lung_img):
        assert img.shape == (256, 256, 8) and np.allclose(img.affine, expected_affine(), atol=1e-5)
        assert np.allclose(img.header.get_zooms(), (SPACING[1], SPACING[0], DZ))
    mask = np.asarray(mask_img.dataobj)
    lung = np.asarray(lung_img.dataobj)
    assert np.array_equal(mask, a.infection.transpose(2, 1, 0))
    assert np.array_equal(lung, a.lung.transpose(2, 1, 0))
    assert set(np.unique(mask)) <= {0, 1} and not (mask & ~lung.astype(bool)).any()  # lesions are in the lung

    r = json.loads(out["report.json"][0])
    assert r == json.loads(json.dumps(a.report))
    vv = r["voxel_volume_mm3"]
    assert vv == pytest.approx(SPACING[0] * SPACING[1] * DZ, rel=1e-9)
    assert r["lesion_volume_ml"] == int(mask.sum()) * vv / 1000  # exactly
    assert r["lung_volume_ml"] == int(lung.sum()) * vv / 1000
    assert r["lesion_voxels"] == int(mask.sum()) > 0 and r["lung_voxels"] == int(lung.sum()) > 0
    assert r["percent_involved"] == pytest.approx(100 * mask.sum() / lung.sum())
    assert 0 < r["percent_involved"] < 100 and r["ct_score"] == study.ct_score(r["percent_involved"])
    assert r["spacing_mm"] == [DZ, SPACING[0], SPACING[1]] and r["shape"] == [8, 256, 256] and r["n_slices"] == 8
    # per side: the two sides partition the lung and its lesions
    sides = r["sides"]
    assert set(sides) == {"left", "right"}
    assert sum(s["lesion_volume_ml"] for s in sides.values()) == pytest.approx(r["lesion_volume_ml"])
    assert sum(s["lung_volume_ml"] for s in sides.values()) == pytest.approx(r["lung_volume_ml"])
    # the patient's right lung is on the image's left in these standard axials
    image_left_ml = np.count_nonzero(a.lung[:, :, :128]) * vv / 1000
    assert sides["right"]["lung_volume_ml"] == pytest.approx(image_left_ml, rel=0.1)
    # key slices
    area = np.count_nonzero(a.infection, axis=(1, 2)) * SPACING[0] * SPACING[1]
    top = r["top_slices"]
    assert 1 <= len(top) <= 5 and [t["lesion_area_mm2"] for t in top] == sorted(
        (t["lesion_area_mm2"] for t in top), reverse=True)
    assert top[0]["lesion_area_mm2"] == pytest.approx(area.max()) and area[top[0]["index"]] == area.max()
    assert r["model"]["backend"] == "fp32" and len(r["model"]["weights_digest"]) == 64 and r["lung_method"]


def test_masks_agree_with_experts(dicom_case):
    """The lung mask follows the expert lung masks, and the infection the expert infection (loosely: the
    model's held-out Dice is ~0.5)."""
    a = dicom_case["analysis"]
    for k, stem in enumerate(STEMS):
        gt_lung = cv2.imread(str(FIXTURES / "lung-masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert dice_iou_counts(a.lung[k] > 0, gt_lung)[0] > 0.8, stem
    inf = np.stack([a.infection[k] > 0 for k in range(4)])
    gt = np.stack([cv2.imread(str(FIXTURES / "masks" / f"{s}.png"), cv2.IMREAD_GRAYSCALE) > 0 for s in STEMS])
    assert dice_iou_counts(inf, gt)[0] > 0.3


def test_image_outputs(dicom_case):
    out = dicom_case["outputs"]
    names = list(out)
    assert names[:5] == ["report.json", "mask.nii.gz", "lung_mask.nii.gz", "mask.seg.dcm", "summary.png"]
    assert names[5:] == [f"overlays/{k:04d}.png" for k in range(8)]
    assert study.n_outputs(dicom_case["volume"]) == len(names)
    assert out["report.json"][1] == "application/json" and out["summary.png"][1] == "image/png"
    summary = cv2.imdecode(np.frombuffer(out["summary.png"][0], np.uint8), cv2.IMREAD_COLOR)
    assert summary is not None and summary.shape[1] >= 1000
    for k in range(8):
        img = cv2.imdecode(np.frombuffer(out[f"overlays/{k:04d}.png"][0], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (256, 256, 3)
    # the slice with the largest lesion shows its heatmap: coloured pixels inside the lung
    k = dicom_case["analysis"].report["top_slices"][0]["index"]
    img = cv2.imdecode(np.frombuffer(out[f"overlays/{k:04d}.png"][0], np.uint8), cv2.IMREAD_COLOR).astype(int)
    coloured = np.abs(img[..., 2] - img[..., 0]) > 40
    assert coloured[dicom_case["analysis"].infection[k] > 0].mean() > 0.5


def test_overlay_outline_is_the_counted_infection(dicom_case):
    a = dicom_case["analysis"]
    assert a.probability.dtype == np.float16
    for k in range(8):
        view = study.outputs._view_probability(a, k)
        assert np.array_equal(view >= 0.5, a.infection[k] > 0) and not view[a.lung[k] == 0].any()


def test_progress_reaches_total(dicom_case):
    assert dicom_case["calls"] == [(4, 8), (8, 8)]


def test_shuffled_files_give_identical_results(dicom_case, tmp_path, real_segmenter):
    files = list(dicom_case["files"])
    random.Random(7).shuffle(files)
    files = [(f"renamed_{i}.dcm", data) for i, (_, data) in enumerate(files)]
    assert [d for _, d in files] != [d for _, d in dicom_case["files"]]
    meta = study.unpack_study_upload(files, tmp_path / "norm", salt="test-salt")
    assert meta == dicom_case["meta"]
    for k in range(8):  # the normalised, de-identified files are byte-identical
        assert (tmp_path / "norm" / f"{k:04d}.dcm").read_bytes() == \
            (dicom_case["root"] / "norm" / f"{k:04d}.dcm").read_bytes()
    vol = study.load_study(tmp_path / "norm")
    a = study.analyse_study(vol, real_segmenter, batch_size=4)
    assert np.array_equal(a.infection, dicom_case["analysis"].infection)
    assert np.array_equal(a.lung, dicom_case["analysis"].lung)
    assert a.report == dicom_case["analysis"].report


def test_mirrored_orientation_swaps_patient_sides(dicom_case, tmp_path, real_segmenter):
    """Same pixels, columns running to the patient's RIGHT: the numbers stay, left and right swap."""
    def mirror(k, ds):
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]

    files = dicom_files(tmp_path / "src", dicom_case["hu"], seed=3, tamper=mirror)
    meta = study.unpack_study_upload(files, tmp_path / "norm")
    assert meta["orientation"] == "RPI"   # columns to the right, rows posterior, slice normal inferior
    vol = study.load_study(tmp_path / "norm")
    a = study.analyse_study(vol, real_segmenter, batch_size=4)
    ref = dicom_case["analysis"].report
    assert np.array_equal(vol.slices, dicom_case["volume"].slices[::-1])  # palindrome: same batches
    assert a.report["lesion_volume_ml"] == ref["lesion_volume_ml"]
    assert a.report["sides"]["left"] == ref["sides"]["right"]
    assert a.report["sides"]["right"] == ref["sides"]["left"]


def test_deidentified_files_keep_geometry(dicom_case):
    folder = dicom_case["root"] / "norm"
    originals = {}
    for _, data in dicom_case["files"]:
        ds = pydicom.dcmread(io.BytesIO(data))
        originals[float(ds.ImagePositionPatient[2])] = ds
    orig_any = next(iter(originals.values()))
    outs = [pydicom.dcmread(folder / f"{k:04d}.dcm") for k in range(8)]
    assert sorted(p.name for p in folder.iterdir()) == [f"{k:04d}.dcm" for k in range(8)]
    for k, ds in enumerate(outs):
        raw = (folder / f"{k:04d}.dcm").read_bytes()
        for secret in SECRETS + [orig_any.SeriesInstanceUID.encode(), orig_any.StudyInstanceUID.encode()]:
            assert secret not in raw, secret
        assert str(ds.PatientName) == "" and ds.PatientID == "" and "PatientBirthDate" not in ds
        assert "InstitutionName" not in ds and ds.AccessionNumber == "" and str(ds.ReferringPhysicianName) == ""
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert not any(e.tag.is_private for e in ds)
        src = originals[float(ds.ImagePositionPatient[2])]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(ORIGIN[2] + k * DZ)  # sorted by position
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "Rows", "Columns", "SOPClassUID", "Modality"):
            assert ds[key].value == src[key].value, key
        assert np.array_equal(ds.pixel_array, src.pixel_array)
        assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SeriesInstanceUID == outs[0].SeriesInstanceUID != src.SeriesInstanceUID
        assert ds.StudyInstanceUID == outs[0].StudyInstanceUID != src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == outs[0].FrameOfReferenceUID
    assert len({ds.SOPInstanceUID for ds in outs}) == 8
    meta_text = json.dumps(dicom_case["meta"]).encode()
    assert not any(s in meta_text for s in SECRETS + [orig_any.SeriesInstanceUID.encode()])
    assert dicom_case["meta"]["series_uid_hash"] == study.deidentify._series_key_hash(orig_any.SeriesInstanceUID,
                                                                                      "test-salt")


def test_uid_hash_and_remap_depend_on_salt(dicom_case, tmp_path):
    files = sorted(dicom_case["files"], key=lambda f: float(pydicom.dcmread(io.BytesIO(f[1])).ImagePositionPatient[2]))
    files = files[:3]
    a = study.unpack_study_upload(files, tmp_path / "a", salt="one")
    b = study.unpack_study_upload(files, tmp_path / "b", salt="two")
    assert a["series_uid_hash"] != b["series_uid_hash"]
    ua = pydicom.dcmread(tmp_path / "a" / "0000.dcm").SeriesInstanceUID
    ub = pydicom.dcmread(tmp_path / "b" / "0000.dcm").SeriesInstanceUID
    assert ua != ub and ua.startswith("2.25.") and len(ua) <= 64


def test_deidentify_can_be_turned_off(dicom_case, tmp_path):
    meta = study.unpack_study_upload(dicom_case["files"][:2], tmp_path / "n", deidentify=False)
    assert meta["deidentified"] is False
    ds = pydicom.dcmread(tmp_path / "n" / "0000.dcm")
    assert str(ds.PatientName) == "Doe^John"


def test_zip_upload_skips_junk_and_non_dicom(dicom_case, tmp_path):
    members = [(f"series/IM{i}", d) for i, (_, d) in enumerate(dicom_case["files"])]
    members += [("series/README.txt", b"exported by PACS"), ("__MACOSX/series/._IM0", b"\x00\x05"),
                ("series/.DS_Store", b"junk")]
    meta = study.unpack_study_upload([("Doe_John_CT.zip", zip_bytes(members))], tmp_path / "z", salt="test-salt")
    assert meta["n_slices"] == 8 and meta["skipped_files"] == 3
    assert meta["series_uid_hash"] == dicom_case["meta"]["series_uid_hash"]
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == [f"{k:04d}.dcm" for k in range(8)]


def test_raw_dicom_without_file_meta(small_hu, tmp_path):
    """DICOM datasets without preamble and file meta (explicit VR little endian) are accepted."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    raw = []
    for name, data in dicom_files(tmp_path / "s", small_hu):
        ds = pydicom.dcmread(io.BytesIO(data))
        del ds.file_meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, ds)
        raw.append((name, fp.getvalue()))
    assert raw[0][1][128:132] != b"DICM"
    study.unpack_study_upload(raw, tmp_path / "n")
    assert np.array_equal(study.load_study(tmp_path / "n").slices, small_hu.astype(np.float32))


def test_dest_must_be_empty(small_hu, tmp_path):
    files = dicom_files(tmp_path / "s", small_hu)
    study.unpack_study_upload(files, tmp_path / "n")
    with pytest.raises(ValueError, match="not empty"):
        study.unpack_study_upload(files, tmp_path / "n")


# ---------------------------------------------------------------------------------------------------- NIfTI
def test_nifti_study_keeps_grid_and_affine(tmp_path, real_segmenter):
    hu = real_hu(STEMS[:3])   # 6 slices
    # source array order: rows reversed and axes permuted, so the reader must reorient and write back
    data = np.ascontiguousarray(hu.transpose(1, 2, 0)[::-1])           # (rows reversed, cols, slices)
    affine = np.array([[0, -0.8, 0, 30], [0.8, 0, 0, -40], [0, 0, 2.5, -60], [0, 0, 0, 1]], float)
    src = write_nifti(tmp_path / "ct.nii.gz", data, affine)
    img = nib.load(str(src))
    img.header["descrip"] = b"Doe^John 19500101"
    nib.save(img, str(src))
    meta = study.unpack_study_upload([("x.bin", src.read_bytes())], tmp_path / "norm")
    assert meta["format"] == "nifti" and meta["n_slices"] == 6 and meta["shape"] == [6, 256, 256]
    assert meta["spacing"] == pytest.approx([2.5, 0.8, 0.8]) and meta["orientation"] == "LPS" and meta["is_hu"]
    assert sorted(p.name for p in (tmp_path / "norm").iterdir()) == ["volume.nii.gz"]
    norm = nib.load(str(tmp_path / "norm" / "volume.nii.gz"))
    assert b"Doe" not in norm.header["descrip"].tobytes() and np.array_equal(np.asarray(norm.dataobj), data)

    vol = study.load_study(tmp_path / "norm")
    a = study.analyse_study(vol, real_segmenter, batch_size=8)
    out = outputs_of(vol, a)
    mimg = nifti_from_bytes(out["mask.nii.gz"][0])
    mask = np.asarray(mimg.dataobj)
    assert mask.shape == data.shape and np.array_equal(mimg.affine, img.affine)
    assert np.array_equal(mimg.header.get_sform(), img.header.get_sform())
    assert np.array_equal(mask, vol.mask_to_source_array(a.infection))
    r = a.report
    assert r["voxel_volume_mm3"] == pytest.approx(0.8 * 0.8 * 2.5, rel=1e-6)
    assert r["lesion_volume_ml"] == int(mask.sum()) * r["voxel_volume_mm3"] / 1000 and mask.sum() > 0
    lung = np.asarray(nifti_from_bytes(out["lung_mask.nii.gz"][0]).dataobj)
    assert lung.shape == data.shape and r["lung_volume_ml"] == int(lung.sum()) * r["voxel_volume_mm3"] / 1000


def test_uncompressed_nifti_and_4d_singleton(tmp_path):
    data = real_hu(STEMS[:1], palindrome=False).transpose(2, 1, 0)[..., None]   # (x, y, 1, 1)
    src = write_nifti(tmp_path / "ct.nii", data, np.diag([0.7, 0.7, 3.0, 1.0]))
    meta = study.unpack_study_upload([("ct.nii", src.read_bytes())], tmp_path / "norm")
    assert meta["n_slices"] == 1 and meta["shape"] == [1, 256, 256]
    assert study.load_study(tmp_path / "norm").slices.shape == (1, 256, 256)


# ---------------------------------------------------------------------------------------------------- cancel
def test_should_stop_abandons_the_study(dicom_case, real_segmenter):
    calls, asked = [], []

    def should_stop():
        asked.append(1)
        return len(asked) > 1   # let the first batch run, stop before the second

    with pytest.raises(StudyCancelled):
        study.analyse_study(dicom_case["volume"], real_segmenter, batch_size=4,
                            progress=lambda d, n: calls.append((d, n)), should_stop=should_stop)
    assert calls == [(4, 8)] and len(asked) == 2


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def small_hu():
    return real_hu(STEMS[:2], palindrome=False)[[0, 1, 0, 1]]  # 4 slices


def _refused(files, dest, match, **kw):
    with pytest.raises(StudyError, match=match) as info:
        study.unpack_study_upload(files, dest, **kw)
    assert not list(dest.glob("*.dcm")) and not (dest / ".incoming").exists() and not (dest / "volume.nii.gz").exists()
    msg = str(info.value)
    assert "Doe" not in msg and "Traceback" not in msg
    return msg


def test_two_equally_large_series_are_listed(small_hu, tmp_path):
    a = dicom_files(tmp_path / "a", small_hu, seed=1)
    b = dicom_files(tmp_path / "b", small_hu, seed=2)
    uid_a = pydicom.dcmread(io.BytesIO(a[0][1])).SeriesInstanceUID
    uid_b = pydicom.dcmread(io.BytesIO(b[0][1])).SeriesInstanceUID
    msg = _refused(a + b, tmp_path / "out", "mixes 2 DICOM series")
    assert uid_a in msg and uid_b in msg and "series_uid" in msg
    meta = study.unpack_study_upload(a + b, tmp_path / "ok", series_uid=uid_b)
    assert meta["n_slices"] == 4 and meta["series_count"] == 2 and meta["skipped_files"] == 4
    assert meta["series_uid_hash"] == study.deidentify._series_key_hash(uid_b, study.DEFAULT_SALT)
    msg = _refused(a + b, tmp_path / "out2", "not in the upload", series_uid="1.2.3.4")
    assert uid_a in msg


def test_largest_series_is_chosen(small_hu, tmp_path):
    a = dicom_files(tmp_path / "a", small_hu, seed=1)
    b = dicom_files(tmp_path / "b", small_hu[:2], seed=2)   # e.g. a short second series
    meta = study.unpack_study_upload(b + a, tmp_path / "ok")
    assert meta["n_slices"] == 4 and meta["series_count"] == 2 and meta["skipped_files"] == 2


def test_missing_position(small_hu, tmp_path):
    def drop(k, ds):
        if k == 2:
            del ds.ImagePositionPatient

    _refused(dicom_files(tmp_path / "s", small_hu, tamper=drop), tmp_path / "out", "positions are missing")


def test_duplicate_position(small_hu, tmp_path):
    files = dicom_files(tmp_path / "s", small_hu)
    _refused(files + [("copy.dcm", files[1][1])], tmp_path / "out", "two slices at the same position")


def test_missing_slice_gap(small_hu, tmp_path):
    hu = np.concatenate([small_hu, small_hu])
    files = dicom_files(tmp_path / "s", hu)
    gone = [f for f in files if round(float(pydicom.dcmread(io.BytesIO(f[1])).ImagePositionPatient[2]))
            != round(ORIGIN[2] + 3 * DZ)]
    assert len(gone) == 7
    _refused(gone, tmp_path / "out", r"irregular slice spacing: a gap of 10\.00 mm")


def test_mixed_slice_sizes(small_hu, tmp_path):
    files = dicom_files(tmp_path / "a", small_hu)
    other = dicom_files(tmp_path / "b", small_hu[:1, :128, :128], origin=(ORIGIN[0], ORIGIN[1], ORIGIN[2] + 50))
    series = pydicom.dcmread(io.BytesIO(files[0][1])).SeriesInstanceUID
    ds = pydicom.dcmread(io.BytesIO(other[0][1]))
    ds.SeriesInstanceUID = series
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    _refused(files + [("odd", buf.getvalue())], tmp_path / "out", r"different sizes in one series: 256x256 \(4 "
             r"files\), 128x128 \(1 files\)")


def test_not_ct_not_axial_no_pixels_truncated(small_hu, tmp_path):
    def mr(k, ds):
        ds.Modality = "MR"

    def sagittal(k, ds):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    def no_pixels(k, ds):
        if k == 1:
            del ds.PixelData

    _refused(dicom_files(tmp_path / "a", small_hu, tamper=mr), tmp_path / "o1", "is MR, not CT")
    _refused(dicom_files(tmp_path / "b", small_hu, tamper=sagittal), tmp_path / "o2", "not axial")
    _refused(dicom_files(tmp_path / "c", small_hu, tamper=no_pixels), tmp_path / "o3", "without pixel data")
    files = dicom_files(tmp_path / "d", small_hu)
    files[2] = (files[2][0], files[2][1][:-5000])
    _refused(files, tmp_path / "o4", r"upload file \d: .*pixel data")


def test_zip_with_unsafe_paths(small_hu, tmp_path):
    files = dicom_files(tmp_path / "s", small_hu)
    for bad in ("../../etc/evil.dcm", "/abs/x.dcm", "a/../../x.dcm", "..\\x.dcm"):
        members = [(f"ok{i}", d) for i, (_, d) in enumerate(files)] + [(bad, files[0][1])]
        _refused([("s.zip", zip_bytes(members))], tmp_path / "out", "unsafe path")
    assert not (tmp_path / "etc").exists() and not (tmp_path.parent / "x.dcm").exists()


def test_zip_bomb_and_file_caps(small_hu, tmp_path):
    bomb = zip_bytes([("a.dcm", b"\x00" * (20 * 1024 * 1024))])
    assert len(bomb) < 100_000
    _refused([("b.zip", bomb)], tmp_path / "o1", "upload too large.*unpacks to 20.0 MiB",
             max_bytes=5 * 1024 * 1024)
    files = dicom_files(tmp_path / "s", small_hu)
    _refused([("s.zip", zip_bytes(files))], tmp_path / "o2", "too many files.*4 files", max_files=3)
    _refused(files, tmp_path / "o3", "too many files", max_files=3)
    _refused(files, tmp_path / "o4", "upload too large", max_bytes=100_000)


def test_broken_and_foreign_inputs(small_hu, tmp_path):
    files = dicom_files(tmp_path / "s", small_hu)
    z = zip_bytes(files)
    _refused([("s.zip", z[: len(z) // 2])], tmp_path / "o1", "broken zip")
    _refused([("notes.dcm", b"Patient Doe, please find the scan attached\n")], tmp_path / "o2",
             "the uploaded file is a text file: expected a DICOM file")
    png = cv2.imencode(".png", np.zeros((32, 32), np.uint8))[1].tobytes()
    _refused(files + [("slice.dcm", png)], tmp_path / "o3", r"upload file 5 is a PNG image")
    _refused([("x", b"")], tmp_path / "o4", "empty")
    _refused([], tmp_path / "o5", "no file uploaded")
    _refused([("x.gz", gzip.compress(b"hello" * 100))], tmp_path / "o6", "gzip file that is not a NIfTI")
    nii = write_nifti(tmp_path / "v.nii.gz", small_hu.transpose(2, 1, 0), np.eye(4)).read_bytes()
    _refused(files + [("v.nii.gz", nii)], tmp_path / "o7", "NIfTI volume must be uploaded alone")
    _refused([("v.nii.gz", nii[:-3000])], tmp_path / "o8", "NIfTI")
    thin = write_nifti(tmp_path / "t.nii", np.zeros((8, 256, 4), np.int16), np.eye(4)).read_bytes()
    _refused([("t.nii", thin)], tmp_path / "o10", "axial slices of 8x256 voxels are out of range")
    _refused([("z.zip", zip_bytes([("readme.txt", b"nothing here")]))], tmp_path / "o9", "no DICOM files")


def test_dicom_seg_of_a_study(dicom_case):
    """mask.seg.dcm holds the infection and lung segments exactly, on the stored (de-identified) slices in
    spatial order, with the stored series' study, patient and frame of reference."""
    import pydicom

    from shared.core.dicom_seg import INFECTION, LUNG, read_dicom_seg_masks

    vol, a, out = dicom_case["volume"], dicom_case["analysis"], dicom_case["outputs"]
    data, ctype = out["mask.seg.dcm"]
    assert ctype == "application/dicom" and a.report["dicom_seg"] == "mask.seg.dcm"
    assert json.loads(out["report.json"][0])["dicom_seg"] == "mask.seg.dcm"
    masks, uids = read_dicom_seg_masks(data)
    stored = sorted((pydicom.dcmread(str(p)) for p in (dicom_case["root"] / "norm").glob("*.dcm")),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    assert uids == [d.SOPInstanceUID for d in stored] == [d.SOPInstanceUID for d in vol.source_datasets]
    original = {pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for _, b in dicom_case["files"]}
    assert not original & set(uids)                              # de-identified UIDs, not the upload's
    assert np.array_equal(masks[INFECTION.label], a.infection) and masks[INFECTION.label].sum() > 0
    assert np.array_equal(masks[LUNG.label], a.lung)
    seg = pydicom.dcmread(io.BytesIO(data))
    assert seg.Modality == "SEG" and seg.PatientID == stored[0].PatientID
    assert seg.FrameOfReferenceUID == stored[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == stored[0].StudyInstanceUID
    assert seg.ManufacturerModelName == "covidseg-unet-resnet34"


def test_dicom_seg_failure_is_a_report_warning(dicom_case):
    """A series highdicom cannot describe (here: no FrameOfReferenceUID) loses only mask.seg.dcm."""
    import copy
    import dataclasses

    vol = copy.copy(dicom_case["volume"])
    vol.source_datasets = [copy.deepcopy(d) for d in vol.source_datasets]
    for d in vol.source_datasets:
        del d.FrameOfReferenceUID
    a = dataclasses.replace(dicom_case["analysis"], report=copy.deepcopy(dicom_case["analysis"].report))
    out = outputs_of(vol, a)
    assert "mask.seg.dcm" not in out and "mask.nii.gz" in out and len(out) == study.n_outputs(vol) - 1
    r = json.loads(out["report.json"][0])
    assert r["dicom_seg"] is None and any("DICOM SEG not written" in w for w in r["warnings"])


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_study_on_a_tiny_nifti(tmp_path, real_segmenter, capsys):
    data = real_hu(STEMS[:1]).transpose(2, 1, 0)   # 2 slices
    src = write_nifti(tmp_path / "tiny.nii.gz", data, np.diag([-0.7, -0.7, 5.0, 1.0]))
    out = tmp_path / "out"
    rc = main(["study", str(src), "--out", str(out), "--backend", "fp32"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = out / "tiny"
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert names == ["lung_mask.nii.gz", "mask.nii.gz", "overlays/0000.png", "overlays/0001.png", "report.json",
                     "summary.png"]                                   # NIfTI input: no DICOM SEG
    r = json.loads((d / "report.json").read_text())
    assert r["dicom_seg"] is None
    mask = nib.load(str(d / "mask.nii.gz"))
    assert mask.shape == data.shape and np.array_equal(mask.affine, nib.load(str(src)).affine)
    assert r["lesion_volume_ml"] == int(np.asarray(mask.dataobj).sum()) * r["voxel_volume_mm3"] / 1000
    assert "tiny" in cap.out and "analyse tiny" in cap.err and "2/2" in cap.err


@pytest.mark.parametrize("kind", ["text", "unsafe-zip", "missing", "mixed-sizes-folder"])
def test_cli_study_broken_inputs(kind, tmp_path, small_hu, capsys):
    if kind == "text":
        src = tmp_path / "notes.nii.gz"
        src.write_text("not a volume")
    elif kind == "unsafe-zip":
        src = tmp_path / "s.zip"
        src.write_bytes(zip_bytes([("../x.dcm", b"DICM")]))
    elif kind == "missing":
        src = tmp_path / "nowhere"
    else:
        src = tmp_path / "series"
        dicom_files(src, small_hu)
        write_dicom_series(src, small_hu[:1, :64, :64], seed=9)
        for p in src.iterdir():   # one series: the small slice joins the other's series
            ds = pydicom.dcmread(p)
            if ds.Rows == 64:
                ds.SeriesInstanceUID = pydicom.dcmread(next(q for q in src.iterdir() if q != p)).SeriesInstanceUID
                ds.save_as(p, enforce_file_format=True)
    rc = main(["study", str(src), "--out", str(tmp_path / "out"), "--backend", "fp32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    assert {"text": "text file", "unsafe-zip": "unsafe path", "missing": "no such file",
            "mixed-sizes-folder": "different sizes"}[kind] in err
    assert not (tmp_path / "out").exists()
