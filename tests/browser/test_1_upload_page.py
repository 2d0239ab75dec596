"""The upload page (`/`) in headless Chromium against the real stack: token, drag and drop, live status, viewer,
downloads, batches, keyboard use, narrow screens, error sentences."""
from __future__ import annotations

import base64
import hashlib
import re

import numpy as np

from .conftest import PHONE, SLICES, no_horizontal_overflow, shot, wait_until

PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_dims(data: bytes) -> tuple[int, int]:
    import cv2
    assert data[:8] == PNG_SIG
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return img.shape[1], img.shape[0]


def _enter_token(page, token):
    page.fill("#token-input", token)
    page.press("#token-input", "Enter")


def _drop_files(page, paths):
    """A real `drop` event on the drop zone carrying File objects (as the OS drag and drop does)."""
    items = [[base64.b64encode(p.read_bytes()).decode(), p.name] for p in paths]
    dt = page.evaluate_handle("""(items) => {
        const dt = new DataTransfer();
        for (const [b64, name] of items) {
          const bin = atob(b64); const arr = new Uint8Array(bin.length);
          for (let i = 0; i < bin.length; i++) arr[i] = bin.charCodeAt(i);
          dt.items.add(new File([arr], name, {type: name.endsWith('.png') ? 'image/png' : 'image/jpeg'}));
        }
        return dt; }""", items)
    page.dispatch_event("#dropzone", "dragenter", {"dataTransfer": dt})
    assert "dragover" in page.get_attribute("#dropzone", "class")
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})


def _record_progress(page):
    page.evaluate("""() => { window.__pct = [];
        new MutationObserver(() => document.querySelectorAll('#files .pct').forEach(e => window.__pct.push(e.textContent)))
          .observe(document.getElementById('files'), {subtree: true, childList: true, characterData: true}); }""")


def test_single_slice_upload_view_toggle_download(page, web_stack, worker):
    page.goto(web_stack.url + "/")
    assert page.is_visible("#token-panel")
    assert page.get_attribute("#dropzone", "aria-disabled") == "true"
    # a wrong token is refused with a sentence, and nothing is stored
    _enter_token(page, "cs_not-a-real-token")
    page.wait_for_selector("#token-error:has-text('was not accepted')")
    assert page.text_content("#token-error").strip() == \
        "The API token was not accepted. Enter a valid token and try again."
    assert page.evaluate("() => sessionStorage.getItem('covidseg.apiToken')") is None
    _enter_token(page, web_stack.token)
    page.wait_for_selector("#token-panel", state="hidden")
    assert page.get_attribute("#dropzone", "aria-disabled") == "false"
    assert page.evaluate("() => sessionStorage.getItem('covidseg.apiToken')") == web_stack.token
    assert page.evaluate("() => document.cookie") == ""          # the token is never a cookie

    src = SLICES / "covid_0300.png"
    _record_progress(page)
    _drop_files(page, [src])
    row = page.locator("#files li").first
    row.locator(".name").wait_for()
    assert row.locator(".name").text_content() == "covid_0300.png"
    # the overlay appears in the viewer once the job succeeded
    page.wait_for_selector("#files li[data-status='succeeded']", timeout=120_000)
    page.wait_for_selector("#img-top[data-kind='overlay']:not([hidden])")
    page.wait_for_function("() => document.getElementById('img-top').naturalWidth > 0")
    assert page.text_content("#announce") == "covid_0300.png: succeeded."   # one polite announcement
    uploads = [t for t in page.evaluate("() => window.__pct") if t.startswith("Upload")]
    assert "Upload 100 %" in uploads, uploads                       # XHR upload progress events were shown
    job_id = row.get_attribute("data-job-id")
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert page.evaluate("() => location.hash") == "#job=" + job_id
    api_job = web_stack.get(f"/api/v1/jobs/{job_id}").json()
    assert api_job["status"] == "succeeded"

    # infected fraction, as the API reports it
    shown = page.text_content("#fraction")
    m = re.fullmatch(r"(\d+(?:\.\d+)?) %", shown)
    assert m, shown
    assert abs(float(m.group(1)) - api_job["infected_fraction"] * 100) < 0.06
    # the slice itself sits under the overlay
    assert page.get_attribute("#img-base", "data-kind") == "original"
    natural = page.evaluate("() => [document.getElementById('img-base').naturalWidth, "
                            "document.getElementById('img-base').naturalHeight]")
    assert tuple(natural) == (api_job["input"]["width"], api_job["input"]["height"])
    page.evaluate("() => document.activeElement.blur()")
    shot(page, "upload-overlay", docs=True)

    # toggle the views: click the labels (a radio group: the arrow keys work too), and change the opacity
    page.click("label[for=view-mask]")
    assert page.get_attribute("#img-top", "data-kind") == "mask" and page.is_visible("#img-top")
    page.fill("#opacity", "30")
    assert page.evaluate("() => getComputedStyle(document.getElementById('img-top')).opacity") == "0.3"
    assert page.text_content("#opacity-value") == "30 %"
    shot(page, "upload-mask")
    page.click("label[for=view-original]")
    assert page.is_hidden("#img-top") and page.get_attribute("#stage", "data-view") == "original"
    page.focus("#view-original")
    page.keyboard.press("ArrowRight")
    assert page.is_checked("#view-overlay")
    assert page.get_attribute("#img-top", "data-kind") == "overlay" and page.is_visible("#img-top")

    # download the mask: the file is the job's mask PNG (checksum recorded by the worker), at the slice's size
    with page.expect_download() as dl:
        page.click("[data-download='mask']")
    download = dl.value
    assert download.suggested_filename == "covid_0300_mask.png"
    data = open(download.path(), "rb").read()
    assert hashlib.sha256(data).hexdigest() == api_job["results"]["mask"]["sha256"]
    assert _png_dims(data) == (api_job["input"]["width"], api_job["input"]["height"])
    with page.expect_download() as dl:
        page.click("[data-download='overlay']")
    assert hashlib.sha256(open(dl.value.path(), "rb").read()).hexdigest() == api_job["results"]["overlay"]["sha256"]
    no_horizontal_overflow(page)

    # a reload keeps the job (the URL names it) and the token (same tab)
    page.reload()
    page.wait_for_selector(f"#files li[data-job-id='{job_id}'][data-status='succeeded']")
    page.wait_for_selector("#img-top[data-kind='overlay']:not([hidden])")
    assert page.is_hidden("#token-panel")
    assert page.is_disabled("#view-original")                       # no local file after a reload


def test_batch_by_keyboard_on_a_phone(phone_page, web_stack, worker):
    page = phone_page
    page.goto(web_stack.url + "/")
    page.evaluate("(t) => sessionStorage.setItem('covidseg.apiToken', t)", web_stack.token)
    page.reload()
    no_horizontal_overflow(page)
    # Tab from the top of the page reaches the drop zone; Enter opens the file picker
    page.keyboard.press("Tab")
    for _ in range(15):
        if page.evaluate("() => document.activeElement.id") == "dropzone":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "dropzone"
    with page.expect_file_chooser() as fc:
        page.keyboard.press("Enter")
    assert fc.value.is_multiple()
    paths = [SLICES / "covid_1000.png", SLICES / "medseg_5.jpg"]
    fc.value.set_files([str(p) for p in paths])
    page.wait_for_selector("#batch-panel:not([hidden])")
    batch_id = page.text_content("#batch-id")
    assert re.fullmatch(r"[0-9a-f]{32}", batch_id)
    page.wait_for_selector("#batch-percent:has-text('100 %')", timeout=120_000)
    assert "(2 of 2)" in page.text_content("#batch-percent")
    assert page.locator("#files li[data-status='succeeded']").count() == 2
    names = sorted(page.locator("#files li .name").all_text_contents())
    assert names == ["covid_1000.png", "medseg_5.jpg"]
    batch = web_stack.get(f"/api/v1/batches/{batch_id}").json()
    assert batch["counts"]["succeeded"] == 2 and batch["done"]
    page.wait_for_selector("#img-top:not([hidden])")
    no_horizontal_overflow(page)
    shot(page, "upload-phone", docs=True, full_page=True)
    # Space also opens the picker; other keys do not
    page.focus("#dropzone")
    with page.expect_file_chooser() as fc:
        page.keyboard.press(" ")
    fc.value.set_files([])                                      # the user cancels: nothing is sent
    page.evaluate("() => { window.__picks = 0; document.getElementById('file-input')"
                  ".addEventListener('click', () => window.__picks++); }")
    page.keyboard.press("a")
    page.keyboard.press("Tab")
    assert page.evaluate("() => window.__picks") == 0
    assert page.locator("#files li").count() == 2
    # the viewer's controls are reachable by Tab
    page.focus("#opacity")
    seen = []
    for _ in range(6):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("() => document.activeElement.dataset.download || document.activeElement.id"))
    assert "mask" in seen and "overlay" in seen, seen


def test_api_errors_are_plain_sentences(page, web_stack):
    page.goto(web_stack.url + "/")
    page.evaluate("(t) => sessionStorage.setItem('covidseg.apiToken', t)", web_stack.token)
    page.reload()
    page.set_input_files("#file-input", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"these are not pixels, just a note"}])
    page.wait_for_selector("#upload-error:has-text('not uploaded')")
    text = page.text_content("#upload-error").strip()
    assert text == ("The file was not uploaded. File #1 (notes.png) is not a PNG, JPEG, TIFF or DICOM image "
                    "(type is read from the content).")
    assert page.text_content("#files li .badge") == "not uploaded"
    # too large for the server's limit (4 MB in this stack): refused before sending anything
    requests_seen = []
    page.on("request", lambda req: requests_seen.append(req.url) if req.method == "POST" else None)
    page.set_input_files("#file-input", files=[{"name": "huge.png", "mimeType": "image/png",
                                                "buffer": b"\x89PNG" + b"0" * (5 * 1024 * 1024)}])
    page.wait_for_selector("#files li .err:has-text('huge.png is larger than the 4.0 MB limit')")
    assert requests_seen == []
    # an unknown job id
    page.fill("#open-id", "0" * 32)
    page.press("#open-id", "Enter")
    page.wait_for_selector("#upload-error:has-text('was not found')")
    assert page.text_content("#upload-error").startswith("The job was not found.")
    # the server going away mid-session is a sentence too, not a stack trace
    page.route("**/api/v1/jobs/**", lambda route: route.abort())
    page.fill("#open-id", "1" * 32)
    page.press("#open-id", "Enter")
    page.wait_for_selector("#upload-error:has-text('could not be reached')")
    assert "{" not in page.text_content("#upload-error")
