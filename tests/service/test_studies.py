"""Whole studies through the real service (issue 5): real Redis, SeaweedFS, SQLite and PostgreSQL, gunicorn, and
the two Celery workers (interactive + niced bulk) with the shipped weights.

Studies are built here from the real fixture slices (tests/fixtures/slices) with known geometry: a DICOM series
(pydicom; patient-identifying attributes set on purpose) and a NIfTI volume (nibabel). Volumes stay tiny
(<= 8 slices) so the suite stays quick.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from core.helpers import FIXTURE_SLICES, fixture_slice_hu    # tests/core/helpers.py (tests/ is on sys.path)
from sqlalchemy import select, update

from shared.service import db

REPO = Path(__file__).resolve().parents[2]
SLICES = REPO / "tests" / "fixtures" / "slices"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-XYZ"
PIXEL_SPACING = (0.7, 0.8)       # (row spacing, column spacing) mm
SLICE_STEP = 2.5                 # mm between slice positions
TERMINAL = ("succeeded", "failed", "cancelled")


# --- building studies ---------------------------------------------------------------------------------------------
def _hu_slices(n: int) -> list[np.ndarray]:
    """n real CT slices (the four 256x256 COVID-19-CT-Seg fixtures, repeated) as Hounsfield units: the inverse of
    the lung window (-600, 1500) the service applies, so the model sees the fixture images."""
    return [np.round(fixture_slice_hu(FIXTURE_SLICES[k % len(FIXTURE_SLICES)])) for k in range(n)]


def _dicom_series(n: int = 6, series_uid: str | None = None, skip: tuple = (), size: dict | None = None,
                  series_number: int = 2) -> list[bytes]:
    """A CT series of n slices with identifying attributes; `skip` leaves positions out (a gap), `size` gives
    some slices another matrix size (a broken series)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    out = []
    for k, hu in enumerate(_hu_slices(n)):
        if k in skip:
            continue
        if size and k in size:
            import cv2
            hu = cv2.resize(hu, size[k], interpolation=cv2.INTER_NEAREST)
        stored = (hu + 1024).astype(np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19600101"
        ds.InstitutionName, ds.ReferringPhysicianName = "St Example Hospital", "House^Gregory"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-90.0, -100.0, -50.0 + k * SLICE_STEP]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_STEP
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def _zip(files: list[bytes], names: list[str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, data in enumerate(files):
            zf.writestr(names[i] if names else f"series/IM{i:04d}", data)
    return buf.getvalue()


NIFTI_AFFINE = np.array([[-0.75, 0.0, 0.0, 95.0], [0.0, -0.75, 0.0, 110.0], [0.0, 0.0, 3.0, -40.0],
                         [0.0, 0.0, 0.0, 1.0]])


def _nifti(n: int = 5) -> bytes:
    """A .nii.gz volume (x, y, z) = (256, 256, n) of HU with a non-trivial affine (0.75 x 0.75 x 3 mm)."""
    import gzip

    import nibabel as nib
    vol = np.stack(_hu_slices(n), axis=-1).transpose(1, 0, 2).astype(np.int16)   # (x=cols, y=rows, z)
    img = nib.Nifti1Image(vol, NIFTI_AFFINE)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=1)


# --- talking to the service ----------------------------------------------------------------------------------------
def _post_study(stack, files: list[tuple[str, bytes]], headers=None, data=None):
    return stack.post("/api/v1/studies", files=[("file", (name, payload, "application/octet-stream"))
                                                for name, payload in files],
                      data=data or {}, headers={**stack.auth, **(headers or {})}, timeout=120)


def _wait_study(stack, study_id: str, statuses=TERMINAL, timeout: float = 400.0, samples: list | None = None):
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        r = stack.get(f"/api/v1/studies/{study_id}")
        assert r.status_code == 200, r.text
        body = r.json()
        if samples is not None:
            samples.append((body["status"], body["progress"]))
        if body["status"] in statuses:
            return body
        time.sleep(0.15)
    raise AssertionError(f"study {study_id} not in {statuses} after {timeout}s: {body}\n{stack.tail_logs()}")


def _study_row(stack, study_id: str) -> db.Study:
    with stack.Session() as s:
        return s.execute(select(db.Study).where(db.Study.id == study_id)).scalar_one()


def _load_nifti(data: bytes):
    import gzip

    import nibabel as nib
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _expected_dicom_volume(files: list[bytes], tmp_path: Path):
    """The volume the service should see: the series read locally with the project's own DICOM reader."""
    from shared.core.imageio import read_dicom_series
    folder = tmp_path / "series"
    folder.mkdir(exist_ok=True)
    for i, data in enumerate(files):
        (folder / f"{i:04d}.dcm").write_bytes(data)
    return read_dicom_series(folder)


def _check_report(report: dict, n_slices: int, spacing_zyx, shape_zyx):
    for key in ("lesion_volume_ml", "lung_volume_ml", "percent_involved", "ct_score", "sides", "voxel_volume_mm3",
                "spacing_mm", "shape", "n_slices", "top_slices", "model", "lung_method"):
        assert key in report, key
    assert report["n_slices"] == n_slices and report["shape"] == list(shape_zyx)
    assert report["spacing_mm"] == pytest.approx(list(spacing_zyx), rel=1e-4)
    assert report["voxel_volume_mm3"] == pytest.approx(float(np.prod(spacing_zyx)), rel=1e-4)
    assert report["ct_score"] in (0, 1, 2, 3, 4)
    assert set(report["sides"]) == {"left", "right"}
    for side in report["sides"].values():
        assert {"lesion_volume_ml", "lung_volume_ml", "percent_involved"} <= set(side)
    assert report["lung_volume_ml"] > 0            # real CT slices: lungs are found
    assert len(report["top_slices"]) <= 5
    assert all(0 <= t["index"] < n_slices and t["lesion_area_mm2"] > 0 for t in report["top_slices"])


def _check_volumes(stack, study: dict, report: dict, voxel_mm3: float):
    """lesion mL == lesion voxel count x voxel volume (and the same for the lung), counted in the result NIfTIs."""
    mask = _load_nifti(stack.get(study["links"]["mask"]).content)
    lung = _load_nifti(stack.get(study["links"]["lung_mask"]).content)
    n_lesion = int(np.count_nonzero(np.asarray(mask.dataobj)))
    n_lung = int(np.count_nonzero(np.asarray(lung.dataobj)))
    assert report["lesion_volume_ml"] == pytest.approx(n_lesion * voxel_mm3 / 1000.0, rel=1e-6, abs=1e-9)
    assert report["lung_volume_ml"] == pytest.approx(n_lung * voxel_mm3 / 1000.0, rel=1e-6)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    return mask, lung


# --- end to end -----------------------------------------------------------------------------------------------------
def test_dicom_zip_end_to_end_deidentified_and_shuffled_order_gives_the_same_report(stack, tmp_path):
    """A zip of a DICOM series: progress while running, succeeded, mask NIfTI with the series' geometry,
    lesion mL = voxels x voxel volume, nothing identifying stored; the same files shuffled (sent as separate
    DICOM files in random order) give the same report."""
    stack.ensure_worker()
    files = _dicom_series(6)
    r = _post_study(stack, [("scan of Jane Doe.zip", _zip(files))])
    assert r.status_code == 202, r.text
    body = r.json()
    sid = body["id"]
    assert body["status"] == "queued" and body["progress"] == 0 and body["n_slices"] == 6
    assert r.headers["Location"].endswith(sid) and body["links"]["self"].endswith(sid)
    assert set(body["links"]) >= {"self", "report", "summary", "mask", "lung_mask", "overlays_prefix", "cancel",
                                  "retry"}
    samples: list = []
    study = _wait_study(stack, sid, samples=samples)
    assert study["status"] == "succeeded", (study, stack.tail_logs())
    # progress was reported along the way: a running study with a percentage strictly between 0 and 100
    assert any(st == "running" and 0 < p < 100 for st, p in samples), samples
    progress = [p for _, p in samples]
    assert progress == sorted(progress) and study["progress"] == 100
    assert study["attempts"] == 1 and study["error"] is None and study["format"] == "dicom"
    assert study["started_at"] and study["finished_at"] and study["created_at"] <= study["finished_at"]

    expected = _expected_dicom_volume(files, tmp_path)
    dx, dy, dz = expected.spacing
    assert (dx, dy, dz) == pytest.approx((PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE_STEP), rel=1e-4)
    report = study["report"]
    _check_report(report, 6, (dz, dy, dx), (6, 256, 256))
    assert stack.get(study["links"]["report"]).json() == report      # report.json == the stored report
    mask, _ = _check_volumes(stack, study, report, dx * dy * dz)
    assert mask.shape == (256, 256, 6)
    np.testing.assert_allclose(mask.affine, expected.affine, atol=1e-4)
    summary = stack.get(study["links"]["summary"])
    assert summary.status_code == 200 and summary.content[:8] == b"\x89PNG\r\n\x1a\n"
    overlay = stack.get(study["links"]["overlays_prefix"] + "0005.png")
    assert overlay.status_code == 200 and overlay.headers["Content-Type"] == "image/png"
    assert stack.get(study["links"]["overlays_prefix"] + "0006.png").status_code == 404    # 6 slices: 0-5
    assert stack.get(f"/api/v1/studies/{sid}/files/..%2F..%2Finput.tar").status_code == 404

    # the stored input is the de-identified series: no patient name, ID, birth date or institution
    import pydicom
    raw = stack.storage.get_bytes(f"studies/{sid}/input.tar")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == [f"{k:04d}.dcm" for k in range(6)]
        for m in members:
            data = tar.extractfile(m).read()
            assert PATIENT_NAME.encode() not in data and b"Doe" not in data and PATIENT_ID.encode() not in data
            ds = pydicom.dcmread(io.BytesIO(data))
            assert not str(ds.get("PatientName", "") or "") and str(ds.get("PatientIdentityRemoved")) == "YES"
            assert not str(ds.get("InstitutionName", "") or "")
    assert not stack.storage.exists(f"studies/{sid}/upload")         # the raw upload is never stored

    # the DICOM SEG: downloadable as an attachment, on the stored (de-identified) slices, equal to the NIfTI mask
    from shared.core.dicom_seg import INFECTION, read_dicom_seg_masks
    assert report["dicom_seg"] == "mask.seg.dcm", report["warnings"]
    seg = stack.get(study["links"]["dicom_seg"])
    assert seg.status_code == 200 and seg.headers["Content-Type"] == "application/dicom"
    assert "attachment" in seg.headers["Content-Disposition"] and PATIENT_ID.encode() not in seg.content
    seg_masks, seg_uids = read_dicom_seg_masks(seg.content)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        stored_uids = [pydicom.dcmread(io.BytesIO(tar.extractfile(m).read())).SOPInstanceUID
                       for m in sorted(tar.getmembers(), key=lambda m: m.name)]
    assert seg_uids == stored_uids
    np.testing.assert_array_equal(seg_masks[INFECTION.label], np.asarray(mask.dataobj).transpose(2, 1, 0))

    # shuffled: the same slices as separate DICOM files in random order -> the same report
    order = list(range(6))
    random.Random(5).shuffle(order)
    r2 = _post_study(stack, [(f"x{i}.dcm", files[i]) for i in order])
    assert r2.status_code == 202, r2.text
    again = _wait_study(stack, r2.json()["id"])
    assert again["status"] == "succeeded", again
    assert again["report"] == report
    mask2 = _load_nifti(stack.get(again["links"]["mask"]).content)
    np.testing.assert_array_equal(np.asarray(mask2.dataobj), np.asarray(mask.dataobj))


def test_nifti_end_to_end_keeps_the_inputs_affine_and_shape(stack):
    stack.ensure_worker()
    r = _post_study(stack, [("volume.nii.gz", _nifti(5))])
    assert r.status_code == 202, r.text
    study = _wait_study(stack, r.json()["id"])
    assert study["status"] == "succeeded", (study, stack.tail_logs())
    assert study["format"] == "nifti" and study["n_slices"] == 5
    report = study["report"]
    _check_report(report, 5, (3.0, 0.75, 0.75), (5, 256, 256))
    mask, lung = _check_volumes(stack, study, report, 0.75 * 0.75 * 3.0)
    assert report["dicom_seg"] is None and "dicom_seg" not in study["links"]     # no UIDs to reference
    for img in (mask, lung):
        assert img.shape == (256, 256, 5)
        np.testing.assert_allclose(img.affine, NIFTI_AFFINE, atol=1e-5)


def test_studies_run_on_the_bulk_worker_and_interactive_jobs_on_the_interactive_worker(stack):
    """The priority set-up: a study is processed by the dedicated (niced) bulk worker, a single slice by the
    interactive worker, so interactive work never queues behind studies."""
    stack.ensure_worker()
    r = _post_study(stack, [("s.zip", _zip(_dicom_series(3)))])
    assert r.status_code == 202, r.text
    job = stack.submit([SLICES / "covid_0300.png"])
    assert job.status_code == 202
    job_id = job.json()["jobs"][0]["id"]
    assert stack.wait_job(job_id)["status"] == "succeeded"
    assert _wait_study(stack, r.json()["id"])["status"] == "succeeded"
    with stack.Session() as s:
        job_worker = s.execute(select(db.Job.worker).where(db.Job.id == job_id)).scalar_one()
    study_row = _study_row(stack, r.json()["id"])
    assert study_row.queue == stack.settings.queue_bulk
    assert job_worker.startswith(f"test-{stack.backend}@"), job_worker
    assert study_row.worker.startswith(f"test-{stack.backend}-bulk@"), study_row.worker


# --- refusals ------------------------------------------------------------------------------------------------------
def _refused(r, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error", "code"} and "Traceback" not in r.text
    for w in words:
        assert w.lower() in body["error"].lower(), (w, body)
    return body


def test_broken_uploads_are_refused_with_a_clear_4xx(stack):
    before = _count_studies(stack)
    series = _dicom_series(6)
    # a broken series: one slice missing in the middle (a gap in the positions)
    _refused(_post_study(stack, [("a.zip", _zip(_dicom_series(6, skip=(3,))))]), 400, "spacing")
    # a broken series: slices of different sizes
    _refused(_post_study(stack, [("a.zip", _zip(_dicom_series(4, size={2: (128, 128)})))]), 400, "size")
    # mixed series of the same size without series_uid: the error lists the series and names the way out
    other = _dicom_series(6, series_number=7)
    body = _refused(_post_study(stack, [("mixed.zip", _zip(series + other))]), 400, "series_uid")
    assert "7" in body["error"] and PATIENT_NAME not in body["error"]
    # a broken zip, a PNG instead of DICOM, an empty file, a truncated NIfTI
    _refused(_post_study(stack, [("study.zip", b"PK\x03\x04" + b"\x00garbage" * 50)]), 400, "zip")
    _refused(_post_study(stack, [("ct.dcm", (SLICES / "covid_0300.png").read_bytes())]), 400, "PNG")
    _refused(_post_study(stack, [("a.zip", b"")]), 400, "empty")
    _refused(_post_study(stack, [("v.nii.gz", _nifti(3)[:4000])]), 400)
    # the request itself: not multipart, no file field, a malformed series_uid or Idempotency-Key
    _refused(stack.post("/api/v1/studies", data=b"{}", headers={**stack.auth, "Content-Type": "application/json"}),
             415)
    _refused(stack.post("/api/v1/studies", files={"other": ("a", b"x")}), 400, "file")
    _refused(_post_study(stack, [("a.zip", _zip(series))], data={"series_uid": "1.2.x;DROP"}), 400, "series_uid")
    _refused(_post_study(stack, [("a.zip", _zip(series))], headers={"Idempotency-Key": "bad key"}), 400, "Idempotency-Key")
    # unknown ids, unknown result names, no token
    _refused(stack.get("/api/v1/studies/" + "0" * 32), 404)
    _refused(stack.get("/api/v1/studies/nope"), 404)
    _refused(stack.get("/api/v1/studies?status=done"), 400, "status")
    _refused(stack.get("/api/v1/studies?cursor=zzz"), 400, "cursor")
    import requests
    assert requests.get(stack.url + "/api/v1/studies", timeout=30).status_code == 401
    assert _count_studies(stack) == before          # nothing refused left a row behind


def test_study_uploads_have_their_own_size_cap(stack):
    """Studies are bigger than slices: the jobs API's request cap (8 MB in this stack) does not apply, the study cap
    (COVIDSEG_STUDY_MAX_UPLOAD_BYTES) does, refused from the declared Content-Length before the body is read."""
    import http.client
    big = b"\0" * (stack.settings.max_request_bytes + 1024 * 1024)       # above the jobs cap, below the study cap
    _refused(_post_study(stack, [("big.zip", big)]), 400, "DICOM")
    _refused(stack.submit([("big.png", big, "image/png")]), 413)
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.putrequest("POST", "/api/v1/studies")
        conn.putheader("Authorization", stack.auth["Authorization"])
        conn.putheader("Content-Type", "multipart/form-data; boundary=b")
        conn.putheader("Content-Length", str(stack.settings.study_max_upload_bytes + 2 * 1024 * 1024))
        conn.endheaders(b"--b\r\n")
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["code"] == "request_too_large"
    finally:
        conn.close()


def _count_studies(stack) -> int:
    with stack.Session() as s:
        return len(s.execute(select(db.Study.id)).all())


# --- idempotency, cancel, retry, broker down --------------------------------------------------------------------
def test_idempotency_key_returns_the_same_study(stack):
    key = f"night-run/study-{random.random()}"
    zipped = _zip(_dicom_series(3))
    first = _post_study(stack, [("s.zip", zipped)], headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.text
    again = _post_study(stack, [("renamed.zip", zipped)], headers={"Idempotency-Key": key})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"] and again.json()["idempotent_replay"] is True
    other = _post_study(stack, [("s.zip", _zip(_dicom_series(4)))], headers={"Idempotency-Key": key})
    _refused(other, 422, "Idempotency-Key")
    with stack.Session() as s:
        rows = s.execute(select(db.Study.id).where(db.Study.idempotency_key == key)).all()
    assert [r[0] for r in rows] == [first.json()["id"]]
    listed = stack.get("/api/v1/studies?limit=200").json()["studies"]
    assert [st["id"] for st in listed].count(first.json()["id"]) == 1


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
def test_kill_9_cancel_retry_failure_and_broker_down(stack):
    """kill -9 of the bulk worker mid-study: the sweep re-queues the study and a new worker finishes it, writing the
    same keys. While no bulk worker runs (so nothing races): a queued study is cancelled (idempotently) and its
    message becomes a no-op; a study accepted while Redis is down is stored and published by the sweep; a study
    whose stored input is broken fails with the reason; the failed and the cancelled one are retried to success."""
    import os
    import signal
    stack.ensure_worker()
    killed_id = _post_study(stack, [("k.zip", _zip(_dicom_series(8)))]).json()["id"]
    deadline = time.monotonic() + 240
    while _study_row(stack, killed_id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(stack.bulk_worker.pid, signal.SIGKILL)          # main process and pool child, mid-study
    stack.bulk_worker.wait(30)
    stack.bulk_worker = None
    at_kill = _study_row(stack, killed_id)
    assert at_kill.status == "running" and at_kill.attempts == 1, (at_kill.status, stack.tail_logs())

    # accepted while Redis is down: stored + committed, published later by the sweep
    stack.redis_server.stop()
    try:
        r = _post_study(stack, [("d.zip", _zip(_dicom_series(3)))])
        assert r.status_code == 202, r.text
        down_id = r.json()["id"]
        assert _study_row(stack, down_id).dispatched_at is None
        assert stack.storage.exists(f"studies/{down_id}/input.tar")
    finally:
        stack.redis_server.start()

    # cancelled while queued: its message stays in the queue and must be a no-op when the worker takes it
    cancel_id = _post_study(stack, [("c.zip", _zip(_dicom_series(3)))]).json()["id"]
    r = stack.post(f"/api/v1/studies/{cancel_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert stack.post(f"/api/v1/studies/{cancel_id}/cancel").status_code == 200          # idempotent
    _refused(stack.post(f"/api/v1/studies/{cancel_id}/retry", data="{", headers={
        **stack.auth, "Content-Type": "application/json"}), 400)

    # a study whose stored input is damaged fails with the reason (not retried forever)
    fail_id = _post_study(stack, [("f.zip", _zip(_dicom_series(3)))]).json()["id"]
    good = stack.storage.get_bytes(f"studies/{fail_id}/input.tar")
    good_sha = _study_row(stack, fail_id).input_sha256
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("0000.dcm")
        info.size = 10
        tar.addfile(info, io.BytesIO(b"not dicom!"))
    sha = stack.storage.put_bytes(f"studies/{fail_id}/input.tar", buf.getvalue(), "application/x-tar")
    with stack.Session() as s:
        s.execute(update(db.Study).where(db.Study.id == fail_id).values(input_sha256=sha))
        s.commit()

    stack.ensure_worker()                                  # the bulk worker is back
    assert _wait_study(stack, down_id)["status"] == "succeeded"
    killed = _wait_study(stack, killed_id)
    assert killed["status"] == "succeeded" and killed["attempts"] >= 2 and killed["progress"] == 100, killed
    assert sorted(stack.storage.list_keys(f"studies/{killed_id}/results/")) == sorted(
        [f"studies/{killed_id}/results/{n}" for n in ("mask.nii.gz", "lung_mask.nii.gz", "report.json",
                                                       "summary.png", "mask.seg.dcm")] +
        [f"studies/{killed_id}/results/overlays/{k:04d}.png" for k in range(8)])
    failed = _wait_study(stack, fail_id)
    assert failed["status"] == "failed" and failed["error"] and failed["report"] is None, failed
    assert "Traceback" not in failed["error"]
    _refused(stack.get(failed["links"]["mask"]), 409)
    _refused(stack.post(f"/api/v1/studies/{down_id}/retry"), 409)            # succeeded: nothing to retry
    _refused(stack.post(f"/api/v1/studies/{down_id}/cancel"), 409)           # finished: no cancel
    cancelled = stack.get(f"/api/v1/studies/{cancel_id}").json()
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == 0   # its message was a no-op
    assert stack.storage.list_keys(f"studies/{cancel_id}/results/") == []

    # retry both: the failed one after its input is repaired
    stack.storage.put_bytes(f"studies/{fail_id}/input.tar", good, "application/x-tar", sha256=good_sha)
    with stack.Session() as s:
        s.execute(update(db.Study).where(db.Study.id == fail_id).values(input_sha256=good_sha))
        s.commit()
    for sid in (cancel_id, fail_id):
        r = stack.post(f"/api/v1/studies/{sid}/retry")
        assert r.status_code == 202 and r.json()["status"] in ("queued", "running", "succeeded"), r.text
    for sid in (cancel_id, fail_id):
        done = _wait_study(stack, sid)
        assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None, done
        assert done["retries"] == 1 and done["previous_error"], done     # why the run before the retry ended
    assert _wait_study(stack, cancel_id)["previous_error"] == "cancelled"
    listed = stack.get("/api/v1/studies?status=succeeded&limit=200").json()["studies"]
    assert {cancel_id, fail_id, down_id} <= {st["id"] for st in listed}


# --- no patient data in the database or the logs -----------------------------------------------------------------
def test_database_rows_api_answers_and_logs_never_hold_patient_data(stack):
    stack.ensure_worker()
    r = _post_study(stack, [(f"{PATIENT_NAME}.zip", _zip(_dicom_series(3), names=[f"{PATIENT_NAME}/{i}.dcm"
                                                                                  for i in range(3)]))])
    assert r.status_code == 202, r.text
    sid = r.json()["id"]
    study = _wait_study(stack, sid)
    assert study["status"] == "succeeded", study
    needles = ("Doe", "Jane", PATIENT_ID, "19600101", "Example Hospital", "House")
    with stack.Session() as s:
        rows = s.execute(select(db.Study)).scalars().all()
    assert rows
    for row in rows:    # every study ever stored in this database, every column
        text = json.dumps({c.name: str(getattr(row, c.key)) for c in db.Study.__table__.columns})
        assert not [n for n in needles if n in text], text
    answer = stack.get(f"/api/v1/studies/{sid}").text + stack.get("/api/v1/studies").text
    assert not [n for n in needles if n in answer]
    meta = study["metadata"]
    assert meta["n_slices"] == 3 and meta["modality"] == "CT" and meta.get("deidentified") is True
    for log in (stack.api_log, stack.worker_log, stack.bulk_worker_log):
        text = log.read_text(errors="replace") if log.exists() else ""
        assert not [n for n in needles if n in text], log


# --- web page and admin dashboard -----------------------------------------------------------------------------------
def test_web_page_and_admin_dashboard_show_studies(stack):
    """/studies (public page, bearer token in the browser) and /admin/studies (admin session): pages served with
    the strict CSP, and the admin JSON lists every token's studies with progress, report numbers and the summary."""
    import re
    import subprocess
    import sys

    import requests

    import localstack
    page = requests.get(stack.url + "/studies", timeout=30)
    assert page.status_code == 200 and "studies.js" in page.text and "script-src 'self'" in \
        page.headers["Content-Security-Policy"]
    js = requests.get(stack.url + "/static/web/studies.js", timeout=30)
    assert js.status_code == 200 and "/studies" in js.text
    assert requests.get(stack.url + "/admin/studies", timeout=30, allow_redirects=False).status_code == 302
    assert requests.get(stack.url + "/api/v1/admin/studies", timeout=30).status_code == 401

    user, password = f"studies-admin-{stack.backend}", "a long admin password 9"
    out = subprocess.run([sys.executable, "-m", "cli", "admin", "create", user, "--password-stdin"],
                         input=password + "\n", text=True, capture_output=True, cwd=REPO,
                         env=localstack.service_env(stack.env), timeout=120)
    assert out.returncode == 0 or "exists" in (out.stdout + out.stderr), out.stdout + out.stderr
    web = requests.Session()
    form = web.get(stack.url + "/admin/login", timeout=30).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    r = web.post(stack.url + "/admin/login", data={"username": user, "password": password, "csrf_token": csrf},
                 headers={"Origin": stack.url}, timeout=30, allow_redirects=False)
    assert r.status_code == 303, r.text
    page = web.get(stack.url + "/admin/studies", timeout=30)
    assert page.status_code == 200 and 'data-mode="admin"' in page.text and "studies.js" in page.text
    session_csrf = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text).group(1)
    assert "/admin/studies" in web.get(stack.url + "/admin", timeout=30).text      # linked from the dashboard

    listing = web.get(stack.url + "/api/v1/admin/studies?status=succeeded&limit=5", timeout=30).json()
    assert listing["counts"]["succeeded"] >= 1 and listing["studies"]
    first = listing["studies"][0]
    assert first["status"] == "succeeded" and first["report"]["ct_score"] in (0, 1, 2, 3, 4)
    assert first["token"] == f"tests-{stack.backend}" and first["worker"]
    assert first["links"]["summary"].startswith("/api/v1/admin/studies/")
    summary = web.get(stack.url + first["links"]["summary"], timeout=30)
    assert summary.status_code == 200 and summary.content[:4] == b"\x89PNG"
    found = web.get(stack.url + "/api/v1/admin/studies?q=" + first["id"][:10], timeout=30).json()["studies"]
    assert [st["id"] for st in found] == [first["id"]]
    # state changes need the session's CSRF token; a finished study cannot be cancelled
    assert web.post(stack.url + first["links"]["cancel"], json={}, timeout=30).status_code == 403
    r = web.post(stack.url + first["links"]["cancel"], json={}, timeout=30,
                 headers={"X-CSRF-Token": session_csrf, "Origin": stack.url})
    assert r.status_code == 409 and r.json()["code"] == "study_finished"


# --- contract checks without the workers ---------------------------------------------------------------------------
def test_openapi_documents_every_study_route():
    from api import create_app
    from api.openapi import spec
    from shared.service.settings import Settings
    app = create_app(Settings.from_env({"COVIDSEG_DATABASE_URL": "sqlite://"}))
    paths = spec()["paths"]
    rules = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("studies.")]
    assert len(rules) >= 6
    for rule in rules:
        path = rule.rule.replace("<path:", "<").replace("<", "{").replace(">", "}")
        assert path in paths, path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], (path, method)


def test_the_sweep_recognises_study_messages_in_the_broker():
    """The lost-message check finds a study's id in waiting and unacknowledged messages (kombu's Redis format)."""
    import base64

    from worker.sweep import _job_ids_of_message, jobs_in_broker

    def message(kwargs, unacked=False):
        body = base64.b64encode(json.dumps([[], kwargs, {}]).encode()).decode()
        msg = {"body": body, "headers": {"task": "covidseg.process_study"}, "properties": {"body_encoding": "base64"}}
        return json.dumps([msg, "", "covidseg.bulk"] if unacked else msg)

    class FakeRedis:
        lists = {"covidseg.bulk": [message({"study_id": "s1"}), message({"job_ids": ["j1"]})]}
        unacked = {"t": message({"study_id": "s2"}, unacked=True)}

        def llen(self, k):
            return len(self.lists.get(k, []))

        def lrange(self, k, a, b):
            return self.lists.get(k, [])

        def hlen(self, k):
            return len(self.unacked)

        def hvals(self, k):
            return list(self.unacked.values())
    assert jobs_in_broker(FakeRedis(), ["covidseg.interactive", "covidseg.bulk"]) == {"s1", "s2", "j1"}
    assert _job_ids_of_message(message({"study_id": 7})) == set()


def test_time_limits_fit_a_600_slice_study_below_the_visibility_timeout():
    from shared.service.settings import Settings
    s = Settings()
    soft, hard = s.study_time_limits(600)
    assert soft >= 600 * 1.0 and soft < hard < s.broker_visibility_timeout
    small = Settings.from_env({"COVIDSEG_BROKER_VISIBILITY_TIMEOUT": "900", "COVIDSEG_TASK_TIME_LIMIT": "300",
                               "COVIDSEG_TASK_SOFT_TIME_LIMIT": "240"})
    soft, hard = small.study_time_limits(5000)          # capped: never redelivered while still running
    assert soft < hard < 900


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_db(request, tmp_path):
    """A freshly migrated, empty database (no workers or sweeps look at it) and a token id."""
    import localstack
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'studies.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database(f"studies_{db.new_id()[:12]}")
    localstack.migrate(url)
    engine = db.make_engine(url)
    Session = db.make_sessionmaker(engine)
    with Session() as s:
        token, _ = db.create_token(s, "t")
        s.commit()
        token_id = token.id
    yield engine, Session, token_id
    engine.dispose()


def test_studies_schema_matches_the_model_and_downgrades(fresh_db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import MetaData, inspect

    import localstack
    engine, _, _ = fresh_db
    ours = MetaData()
    for name in ("api_tokens", "studies"):
        db.Base.metadata.tables[name].to_metadata(ours)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(ctx, ours) if not d[0].startswith("remove_")]
    assert diff == [], diff
    assert {"ix_studies_status_created", "ix_studies_token_seq", "ix_studies_token_status_seq",
            "ix_studies_status_heartbeat"} <= {ix["name"] for ix in inspect(engine).get_indexes("studies")}
    url = engine.url.render_as_string(hide_password=False)
    engine.dispose()
    localstack.migrate(url, "0101_admin", downgrade=True)
    assert "studies" not in inspect(engine).get_table_names()
    localstack.migrate(url)
    assert "studies" in inspect(engine).get_table_names()


def _new_study(Session, token_id, **kw) -> str:
    sid = db.new_id()
    values = dict(id=sid, token_id=token_id, queue="q", n_slices=4, upload_fingerprint="0" * 64,
                  input_key=f"studies/{sid}/input.tar", input_sha256="0" * 64, input_size=1, input_format="dicom")
    values.update(kw)
    with Session() as s:
        s.add(db.Study(**values))
        s.commit()
    return sid


def test_study_state_transitions_never_move_backwards(fresh_db):
    """Claim / heartbeat / finish / cancel / retry / stale takeover on SQLite and PostgreSQL: a late or duplicate
    worker cannot touch a finished or cancelled study; the sweep re-queues a dead worker's study and gives up
    after job_max_attempts claims."""
    from datetime import timedelta

    import sqlalchemy.exc
    _, Session, token_id = fresh_db
    sid = _new_study(Session, token_id)
    with Session() as s:
        assert not db.retry_study(s, sid)                                              # queued: nothing to retry
        claimed = db.claim_study(s, sid, "lease1", "w1", stale_after=60)
        assert claimed is not None and claimed.attempts == 1 and claimed.status == "running"
        assert db.claim_study(s, sid, "lease2", "w2", stale_after=60) is None          # live claim: not stolen
        assert db.study_heartbeat(s, sid, "lease1", progress=42.5)
        # the heartbeat goes stale: a new claim takes it over and the old lease can no longer finish
        s.execute(update(db.Study).where(db.Study.id == sid)
                  .values(heartbeat_at=db.utcnow() - timedelta(seconds=600)))
        s.commit()
        assert db.claim_study(s, sid, "lease3", "w3", stale_after=60) is not None
        assert not db.study_heartbeat(s, sid, "lease1")
        assert not db.study_finish_success(s, sid, "lease1", "{}", "{}")
        assert db.study_finish_success(s, sid, "lease3", '{"ct_score": 1}', "{}")
        assert db.claim_study(s, sid, "lease4", "w4", stale_after=0) is None
        assert not db.study_finish_failure(s, sid, "lease3", "late")
        assert not db.cancel_study(s, sid) and not db.study_release(s, sid, "lease3")
        row = s.execute(select(db.Study).where(db.Study.id == sid)).scalar_one()
        s.refresh(row)
        assert (row.status, row.progress, row.attempts, row.report) == ("succeeded", 100.0, 2, '{"ct_score": 1}')
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            s.execute(update(db.Study).where(db.Study.id == sid).values(progress=101.0))
            s.commit()
        s.rollback()

    other = _new_study(Session, token_id)
    with Session() as s:
        assert db.cancel_study(s, other) and not db.cancel_study(s, other)
        assert db.claim_study(s, other, "l", "w", 60) is None        # a cancelled study's message is a no-op
        assert db.retry_study(s, other)
        assert db.claim_study(s, other, "l", "w", 60) is not None
        assert db.study_finish_failure(s, other, "l", "boom") and db.retry_study(s, other)
        row = s.execute(select(db.Study).where(db.Study.id == other)).scalar_one()
        s.refresh(row)
        assert (row.status, row.attempts, row.error, row.progress) == ("queued", 0, None, 0.0)

    # the sweep: a dead worker's study goes back to the queue, one that used up its attempts fails
    a, b = _new_study(Session, token_id), _new_study(Session, token_id)
    with Session() as s:
        for sid_ in (a, b):
            db.claim_study(s, sid_, "l", "w", 60)
        s.execute(update(db.Study).where(db.Study.id == b).values(attempts=3))
        s.execute(update(db.Study).where(db.Study.id.in_([a, b]))
                  .values(heartbeat_at=db.utcnow() - timedelta(seconds=100)))
        s.commit()
        requeued, failed = db.requeue_stale_studies(s, stale_after=30, max_attempts=3)
        assert requeued == [a] and failed == [b]
        rows = dict(s.execute(select(db.Study.id, db.Study.status).where(db.Study.id.in_([a, b]))).all())
        assert rows == {a: "queued", b: "failed"}


def test_unique_idempotency_key_per_token(fresh_db):
    import sqlalchemy.exc
    _, Session, token_id = fresh_db
    _new_study(Session, token_id, idempotency_key="k1")
    _new_study(Session, token_id)                          # no key: any number of them
    _new_study(Session, token_id)
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        _new_study(Session, token_id, idempotency_key="k1")
