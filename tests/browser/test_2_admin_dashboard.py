"""The admin dashboard (`/admin`) in headless Chromium against the real stack: login, counters, workers, chart,
filters, retry of a really failed job, the job page, keyboard use and narrow screens."""
from __future__ import annotations

from .conftest import ADMIN_PASSWORD, ADMIN_USER, FLOWER_URL, no_horizontal_overflow, shot, wait_until


def _login(page, url, password=ADMIN_PASSWORD):
    page.goto(url + "/admin/")
    page.wait_for_url("**/admin/login**")
    page.fill("#username", ADMIN_USER)
    page.fill("#password", password)
    page.press("#password", "Enter")


def _session_cookie(page):
    return [c for c in page.context.cookies() if c["name"] == "covidseg_admin"]


def test_wrong_password_is_refused(page, web_stack):
    _login(page, web_stack.url, password="not the password at all")
    page.wait_for_selector("#login-error")
    assert page.text_content("#login-error").strip() == "Wrong user name or password."
    assert "/admin/login" in page.url
    assert _session_cookie(page) == []
    # the dashboard's API refuses this browser
    r = page.request.get(web_stack.url + "/api/v1/admin/jobs")
    assert r.status == 401
    shot(page, "admin-wrong-password")


def test_filter_failed_retry_and_job_page(page, web_stack, failed_job, worker):
    _login(page, web_stack.url)
    page.wait_for_url("**/admin/")
    cookie = _session_cookie(page)
    assert cookie and cookie[0]["httpOnly"] and cookie[0]["sameSite"] == "Strict"
    assert page.evaluate("() => document.cookie") == ""            # not readable by script
    # counters, workers (Celery inspect) with the Flower link, and the chart
    page.wait_for_function("() => document.getElementById('count-failed').textContent !== '–'")
    assert int(page.text_content("#count-failed")) >= 1
    page.wait_for_selector("#workers li .mono", timeout=45_000)
    assert "test-browser@" in page.text_content("#workers")
    assert page.get_attribute("#flower-link", "href") == FLOWER_URL
    assert page.locator("#queues li").count() >= 2
    page.wait_for_selector("#chart svg rect.bar-failed")
    assert "failed" in page.get_attribute("#chart svg", "aria-label")

    # filter: failed jobs only
    page.select_option("#f-status", "failed")
    page.click("#filters button[type=submit]")
    row = page.locator(f"#jobs-body tr[data-job-id='{failed_job['id']}']")
    row.wait_for()
    statuses = page.eval_on_selector_all("#jobs-body tr", "rows => rows.map(r => r.dataset.status)")
    assert statuses and set(statuses) == {"failed"}
    assert "NoSuchKey" in row.text_content() or "gave up" in row.text_content()
    no_horizontal_overflow(page)
    shot(page, "admin-dashboard", docs=True)
    # search by id prefix finds it too
    page.fill("#f-q", failed_job["id"][:12])
    page.press("#f-q", "Enter")
    page.wait_for_function("(id) => { const r = document.querySelectorAll('#jobs-body tr');"
                           " return r.length === 1 && r[0].dataset.jobId === id; }", arg=failed_job["id"])

    # retry it: it is queued again and succeeds on the real worker (its upload was restored)
    row.get_by_role("button", name="Retry").click()
    page.wait_for_selector("#action-message:has-text('queued again')")
    final = web_stack.wait_job(failed_job["id"], timeout=120)
    assert final["status"] == "succeeded", final
    # with the failed filter the job disappears from the table after a refresh
    page.click("#filters button[type=submit]")
    page.wait_for_selector("#jobs-empty:not([hidden])")

    # the job page: timeline, attempts, worker, no error
    page.goto(web_stack.url + "/admin/jobs/" + failed_job["id"])
    page.wait_for_selector("#job-status.succeeded")
    timeline = page.text_content("#timeline")
    for step in ("Queued", f"Retried by {ADMIN_USER}", "was failed after 1 attempt(s)", "NoSuchKey", "Running",
                 "Finished: succeeded", "waited", "ran", "total"):
        assert step in timeline, (step, timeline)
    steps = page.eval_on_selector_all("#timeline li strong", "s => s.map(e => e.textContent)")
    assert steps[0] == "Queued" and steps[1] == f"Retried by {ADMIN_USER}" and steps[-1] == "Finished: succeeded"
    details = page.text_content("#details")
    assert "test-browser@" in details and "covid_0340.png" in details
    assert "Attempts since the last retry" in details and "1 · the run before ended: " in details, details
    assert "NoSuchKey" in details.split("the run before ended: ", 1)[1], details   # the error before the retry
    assert page.text_content("#job-error").strip() == "–"
    page.wait_for_selector("#result-panel:not([hidden])")
    page.wait_for_function("() => document.getElementById('job-overlay').naturalWidth > 0")
    assert page.is_hidden("#job-retry") and page.is_hidden("#job-cancel")
    no_horizontal_overflow(page)
    shot(page, "admin-job", docs=True, full_page=True)

    # logging out ends the session
    page.click("text=Log out")
    page.wait_for_url("**/admin/login")
    assert page.request.get(web_stack.url + "/api/v1/admin/stats").status == 401


def test_dashboard_on_a_phone_by_keyboard(phone_page, web_stack, failed_job, worker):
    page = phone_page
    # log in with the keyboard only
    page.goto(web_stack.url + "/admin/login")
    # the user name field has autofocus (applied on a rendering update, possibly after `load`)
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'username'")
    page.keyboard.type(ADMIN_USER)
    page.keyboard.press("Tab")
    page.keyboard.type(ADMIN_PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url("**/admin/")
    page.wait_for_selector("#jobs-body tr")
    no_horizontal_overflow(page)
    # Tab order: the filters, then the table's links and buttons, all reachable
    page.uncheck("#auto-refresh")                   # the table must not change under the keyboard
    page.focus("#main")
    seen = []
    for _ in range(40):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("() => { const e = document.activeElement;"
                                  " return e.id || e.getAttribute('aria-label') || e.textContent.trim(); }"))
    for control in ("flower-link", "f-status", "f-q", "f-batch", "f-after", "f-before", "Apply", "Clear"):
        assert control in seen, (control, seen)
    assert seen.index("f-status") < seen.index("f-q") < seen.index("Apply")
    first_job = [s for s in seen if s.startswith("job ")]
    assert first_job and seen.index(first_job[0]) > seen.index("Apply"), seen      # table links follow
    # Enter on a focused job link opens its page
    page.focus(f"a[aria-label='{first_job[0]}']")
    page.keyboard.press("Enter")
    page.wait_for_url("**/admin/jobs/*")
    shot(page, "admin-phone", docs=True, full_page=True)
    page.wait_for_selector("#job-status:not(:empty)")
    no_horizontal_overflow(page)
