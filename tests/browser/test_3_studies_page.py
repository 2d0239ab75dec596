"""The studies page (`/studies`) in headless Chromium against the real stack: a zipped DICOM series is uploaded,
runs on the bulk worker, shows its numbers and summary, and offers its result files, the DICOM SEG among them;
a NIfTI study offers no DICOM SEG."""
from __future__ import annotations

import io
import re
import zipfile

import numpy as np
from core.helpers import FIXTURE_SLICES, fixture_slice_hu, write_dicom_series, write_nifti  # tests/ on sys.path

from .conftest import no_horizontal_overflow, shot

BUTTONS = ["Report (JSON)", "Infection mask (NIfTI)", "Lung mask (NIfTI)", "Summary (PNG)"]


def _enter_token(page, token):
    page.fill("#token-input", token)
    page.press("#token-input", "Enter")
    page.wait_for_selector("#token-panel", state="hidden")


def _upload(page, path) -> str:
    """Choose the file, submit, wait for the page to say it was accepted; -> the study's short id."""
    before = page.text_content("#upload-status") or ""
    page.set_input_files("#study-files", str(path))
    page.click("#study-submit")
    page.wait_for_function("(b) => { const t = document.getElementById('upload-status').textContent;"
                           " return t !== b && t.includes('accepted'); }", arg=before, timeout=60_000)
    m = re.match(r"Study ([0-9a-f]{8}) accepted", page.text_content("#upload-status"))
    assert m, page.text_content("#upload-status")
    return m.group(1)


def _succeeded_row(page, short_id, timeout=180_000):
    row = page.locator(f"#studies li.study[data-id^='{short_id}']")
    row.locator(".badge.succeeded").wait_for(timeout=timeout)
    return row


def test_dicom_study_shows_results_and_downloads_its_dicom_seg(page, web_stack, worker, tmp_path):
    from shared.core.dicom_seg import INFECTION, LUNG, read_dicom_seg_masks

    hu = np.stack([np.round(fixture_slice_hu(p)) for p in FIXTURE_SLICES])          # 4 real 256² slices
    files = write_dicom_series(tmp_path / "series", hu, patient=("Doe^Jane", "MRN-4711"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in files:
            zf.write(p, p.name)
    (tmp_path / "ct.zip").write_bytes(buf.getvalue())

    page.goto(web_stack.url + "/studies")
    _enter_token(page, web_stack.token)
    row = _succeeded_row(page, _upload(page, tmp_path / "ct.zip"))
    study_id = row.get_attribute("data-id")
    study = web_stack.get(f"/api/v1/studies/{study_id}").json()
    assert study["status"] == "succeeded" and study["report"]["dicom_seg"] == "mask.seg.dcm"
    assert "4 slices · DICOM" in row.locator(".meta").text_content()
    assert row.locator("dd.score").text_content() == f"CT-{study['report']['ct_score']}"
    row.locator(".summary img").wait_for()
    buttons = [b.text_content() for b in row.locator(".actions button").all()]
    assert buttons == BUTTONS + ["Segmentation (DICOM SEG)"]

    with page.expect_download() as dl:
        row.locator(".actions button", has_text="DICOM SEG").click()
    assert dl.value.suggested_filename == f"study-{study_id[:8]}-mask.seg.dcm"
    data = open(dl.value.path(), "rb").read()
    assert data[128:132] == b"DICM" and b"MRN-4711" not in data and b"Doe^Jane" not in data   # de-identified
    masks, uids = read_dicom_seg_masks(data)
    assert len(uids) == 4 and masks[LUNG.label].shape == (4, 256, 256) and masks[LUNG.label].sum() > 0
    assert masks[INFECTION.label].sum() == study["report"]["lesion_voxels"]
    no_horizontal_overflow(page)
    shot(page, "studies-dicom")

    # a NIfTI volume has no per-slice UIDs: no DICOM SEG button
    nifti = write_nifti(tmp_path / "vol.nii.gz", hu[:2].transpose(2, 1, 0).astype(np.int16),
                        np.diag([-0.7, -0.7, 5.0, 1.0]))
    row = _succeeded_row(page, _upload(page, nifti))
    assert "NIfTI" in row.locator(".meta").text_content()
    assert [b.text_content() for b in row.locator(".actions button").all()] == BUTTONS
