"""Browser tests: headless Chromium (Playwright) against the real local stack of tests/conftest.py.

`web_stack` is this package's own service stack (PostgreSQL database, Redis db, S3 bucket, gunicorn API over
real HTTP and a Celery worker with the shipped weights) built with the root conftest's `Stack`, so the dashboard's
counters see only these tests' jobs, and with two settings of its own: no task retries (a job whose upload is
missing fails at once) and a Flower URL. It is torn down when the browser tests end.

Screenshots of every test land in artifacts/screenshots/ (gitignored). With COVIDSEG_DOCS_SCREENSHOTS=1 the tests
also refresh docs/screenshots/*.png (palette PNGs, < 300 KB) for docs/WEB.md.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "screenshots"
DOCS_SHOTS = REPO / "docs" / "screenshots"
SLICES = REPO / "tests" / "fixtures" / "slices"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
ADMIN_USER, ADMIN_PASSWORD = "ward-admin", "a long admin password 7"
FLOWER_URL = "http://127.0.0.1:5555/flower/"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def _root_conftest():
    mod = sys.modules.get("conftest")
    assert mod is not None and hasattr(mod, "Stack"), "tests/conftest.py (the service fixtures) is not loaded"
    return mod


@pytest.fixture(scope="package")
def web_stack(services_dir, redis_server, s3_server, postgres_server, int8_cache):
    import localstack
    root = _root_conftest()
    url = postgres_server.create_database("covidseg_web")
    localstack.migrate(url)
    env = root.make_test_env(url, f"redis://127.0.0.1:{redis_server.port}/7", s3_server.endpoint,
                             "covidseg-browser", task_max_retries=0, flower_url=FLOWER_URL,
                             admin_inspect_timeout=3, admin_cache_seconds=2)   # slack on a loaded machine
    workdir = services_dir / "stack-browser"
    workdir.mkdir(exist_ok=True)
    st = root.Stack("browser", env, workdir, redis_server, s3_server)
    # the real CLI creates the administrator (password on stdin, never on the command line)
    out = subprocess.run([sys.executable, "-m", "cli", "admin", "create", ADMIN_USER, "--password-stdin"],
                         input=ADMIN_PASSWORD + "\n", text=True, capture_output=True, cwd=REPO,
                         env=localstack.service_env(env), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    yield st
    st.close()


@pytest.fixture(scope="package")
def failed_job(web_stack):
    """A job that really failed: submitted while no worker runs, its upload deleted from S3, then the worker
    starts and fails it (no retries in this stack). The upload is put back afterwards, so a retry can succeed.
    Starting the worker here also serves the other tests."""
    from shared.service.storage import input_key
    assert web_stack.worker is None, "the failure must be set up before the worker starts"
    r = web_stack.submit([SLICES / "covid_0340.png"])
    assert r.status_code == 202, r.text
    job_id = r.json()["jobs"][0]["id"]
    key = input_key(job_id)
    original = web_stack.storage.get_bytes(key)
    web_stack.storage.client.remove_object(web_stack.storage.bucket, key)
    web_stack.ensure_worker()
    job = web_stack.wait_job(job_id, timeout=120)
    assert job["status"] == "failed", job
    web_stack.storage.put_bytes(key, original, "image/png")          # restore: a retry can now succeed
    return job


@pytest.fixture(scope="package")
def worker(web_stack, failed_job):
    return web_stack.ensure_worker()


@pytest.fixture(scope="package")
def browser():
    from playwright.sync_api import sync_playwright
    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()
    pw.stop()


def _new_page(browser, request, viewport):
    ctx = browser.new_context(viewport=viewport, accept_downloads=True, locale="en-GB", timezone_id="UTC")
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    # Playwright turns on file-chooser interception asynchronously when the first `filechooser` listener is
    # added; an `expect_file_chooser` whose action runs at once can race it (the chooser then opens natively and
    # no event comes). A listener from the start keeps interception on for the page's whole life.
    page.on("filechooser", lambda chooser: None)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.js_errors = errors
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end.png"), full_page=True)
    except Exception:  # noqa: BLE001 - a crashed page must not hide the test's own failure
        pass
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser, request):
    yield from _new_page(browser, request, DESKTOP)


@pytest.fixture
def phone_page(browser, request):
    yield from _new_page(browser, request, PHONE)


def shot(page, name: str, docs: bool = False, full_page: bool = False) -> Path:
    """Screenshot into artifacts/screenshots/; with docs=True and COVIDSEG_DOCS_SCREENSHOTS=1 also into
    docs/screenshots/ as a palette PNG under 300 KB."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    png = page.screenshot(full_page=full_page)
    path.write_bytes(png)
    if docs and os.environ.get("COVIDSEG_DOCS_SCREENSHOTS") == "1":
        from PIL import Image
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        assert buf.tell() < 300 * 1024, f"{name}: {buf.tell()} bytes"
        (DOCS_SHOTS / f"{name}.png").write_bytes(buf.getvalue())
    return path


def no_horizontal_overflow(page) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"horizontal overflow: content {width[0]} px > viewport {width[1]} px"
    wide = page.evaluate("""() => Array.from(document.querySelectorAll('body *')).filter(e => {
        const r = e.getBoundingClientRect(); return r.width > 0 && r.right > window.innerWidth + 1;
      }).map(e => e.tagName + (e.id ? '#' + e.id : '') + '.' + e.className).slice(0, 5)""")
    assert not wide, f"elements wider than the viewport: {wide}"


def wait_until(fn, timeout=30.0, interval=0.2, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met after {timeout}s (last: {last!r})")
