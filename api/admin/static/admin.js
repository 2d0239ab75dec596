// covidseg admin dashboard: reads and acts only through /api/v1/admin (session cookie + X-CSRF-Token header).
"use strict";
(function () {
  const API = "/api/v1/admin";
  const CSRF = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const { TERMINAL, $, sentence, el } = window.covidsegUI;    // api/web/static/common.js
  const SVG = "http://www.w3.org/2000/svg";

  function errorSentence(status, data) {
    const msg = data && typeof data.error === "string" ? data.error : "";
    if (status === 0) return "The server could not be reached. Check the network connection.";
    if (status === 401) return "Your admin session has ended. Reload the page to log in again.";
    if (status >= 500 && !msg) return "The server had a problem answering. Try again in a moment.";
    return msg ? sentence(msg) : "The request was refused (HTTP " + status + ").";
  }

  async function api(method, path, blob) {
    let resp;
    try {
      resp = await fetch(API + path, {
        method, credentials: "same-origin", cache: "no-store",
        headers: method === "GET" ? { Accept: "application/json" }
          : { Accept: "application/json", "X-CSRF-Token": CSRF, "Content-Type": "application/json" },
        body: method === "GET" ? undefined : "{}",
      });
    } catch (e) { return { ok: false, status: 0, data: null }; }
    let data = null;
    if (blob && resp.ok) data = await resp.blob();
    else { try { data = await resp.json(); } catch (e) { data = null; } }
    if (resp.status === 401) { location.href = "/admin/login?next=" + encodeURIComponent(location.pathname + location.search); }
    return { ok: resp.ok, status: resp.status, data };
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }
  function fmtDur(s) {
    if (s === null || s === undefined) return "–";
    if (s === 0) return "0 s";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 90) return s.toFixed(1) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function secsBetween(a, b) { return a && b ? (new Date(b) - new Date(a)) / 1000 : null; }
  function badge(status) { return el("span", { class: "badge " + status }, status); }

  const pageError = $("#page-error"), actionMessage = $("#action-message");

  async function act(job, action, after) {
    actionMessage.textContent = "";
    pageError.textContent = "";
    const r = await api("POST", "/jobs/" + job.id + "/" + action);
    if (!r.ok) {
      pageError.textContent = (action === "retry" ? "The job could not be retried. " : "The job could not be cancelled. ") + errorSentence(r.status, r.data);
    } else {
      actionMessage.textContent = action === "retry" ? "Job " + job.id.slice(0, 8) + " was queued again."
        : "Job " + job.id.slice(0, 8) + " was cancelled.";
    }
    if (after) after();
  }

  // =============================================================================================================
  // Dashboard
  function dashboard() {
    const form = $("#filters"), tbody = $("#jobs-body");
    const newer = $("#page-newer"), older = $("#page-older"), label = $("#page-label");
    let cursors = [null];   // cursor of each page seen; the last is the current page's
    let nextCursor = null;
    let latest = 0;         // sequence number of the newest jobs request: older answers are dropped

    function toISO(v) { return v ? new Date(v).toISOString() : ""; }
    function query(cursor) {
      const p = new URLSearchParams();
      const fd = new FormData(form);
      if (fd.get("status")) p.set("status", fd.get("status"));
      if (fd.get("q").trim()) p.set("q", fd.get("q").trim().toLowerCase());
      if (fd.get("batch_id").trim()) p.set("batch_id", fd.get("batch_id").trim().toLowerCase());
      if (fd.get("created_after")) p.set("created_after", toISO(fd.get("created_after")));
      if (fd.get("created_before")) p.set("created_before", toISO(fd.get("created_before")));
      p.set("limit", "25");
      if (cursor) p.set("cursor", cursor);
      return p.toString();
    }

    async function loadJobs() {
      const seq = ++latest;
      const r = await api("GET", "/jobs?" + query(cursors[cursors.length - 1]));
      if (seq !== latest) return;   // a newer request (e.g. a filter just applied) is on its way
      if (!r.ok) { pageError.textContent = "The jobs could not be listed. " + errorSentence(r.status, r.data); return; }
      pageError.textContent = "";
      nextCursor = r.data.next_cursor;
      renderJobs(r.data.jobs);
      newer.disabled = cursors.length <= 1;
      older.disabled = !nextCursor;
      label.textContent = "Page " + cursors.length;
    }

    function renderJobs(jobs) {
      const rows = jobs.map((j) => {
        const tr = el("tr", { "data-job-id": j.id, "data-status": j.status });
        const idTd = el("td", { "data-label": "Job" });
        idTd.append(el("a", { href: j.links.page, class: "mono nowrap", title: j.id, "aria-label": "job " + j.id }, j.id.slice(0, 10)));
        if (j.batch_id) idTd.append(el("div", { class: "muted small", title: "batch " + j.batch_id }, "batch " + j.batch_id.slice(0, 8)));
        tr.append(idTd);
        tr.append(el("td", { "data-label": "File", class: "file" }, j.name || "–"));
        const st = el("td", { "data-label": "Status", class: "status" });
        st.append(badge(j.status));
        if (j.status === "failed" && j.error) st.append(el("div", { class: "small err-text", title: j.error }, j.error.slice(0, 80)));
        tr.append(st);
        tr.append(el("td", { "data-label": "Created" }, fmtTime(j.created_at)));
        tr.append(el("td", { "data-label": "Duration" }, TERMINAL.has(j.status) ? fmtDur(secsBetween(j.created_at, j.finished_at)) : "…"));
        tr.append(el("td", { "data-label": "Attempts" }, String(j.attempts)));
        tr.append(el("td", { "data-label": "Worker", class: "worker" }, j.worker ? j.worker.replace(/^celery@/, "") : "–"));
        const actions = el("td", { class: "actions" });
        if (j.status === "failed" || j.status === "cancelled") {
          const b = el("button", { type: "button", class: "btn small", "aria-label": "Retry job " + j.id }, "Retry");
          b.addEventListener("click", () => { b.disabled = true; act(j, "retry", refresh); });
          actions.append(b);
        }
        if (j.status === "queued" || j.status === "running") {
          const b = el("button", { type: "button", class: "btn small danger", "aria-label": "Cancel job " + j.id }, "Cancel");
          b.addEventListener("click", () => { b.disabled = true; act(j, "cancel", refresh); });
          actions.append(b);
        }
        tr.append(actions);
        return tr;
      });
      // Keep the focused action button's row focus stable across refreshes: only replace when something changed.
      const sig = jobs.map((j) => j.id + j.status + j.attempts).join();
      if (tbody.dataset.sig === sig) return;
      tbody.dataset.sig = sig;
      tbody.replaceChildren(...rows);
      $("#jobs-empty").hidden = jobs.length > 0;
    }

    async function loadStats() {
      const r = await api("GET", "/stats");
      if (!r.ok) { pageError.textContent = "The counters could not be loaded. " + errorSentence(r.status, r.data); return; }
      const c = r.data.counters;
      $("#count-queued").textContent = c.queued;
      $("#count-running").textContent = c.running;
      $("#count-failed").textContent = c.failed_24h;
      $("#count-succeeded").textContent = c.succeeded_24h;
      drawChart(r.data.throughput);
    }

    async function loadWorkers() {
      const r = await api("GET", "/workers");
      if (!r.ok) return;
      const q = $("#queues");
      q.replaceChildren(...r.data.queues.map((x) => {
        const li = el("li");
        const unacked = x.name.startsWith("unacknowledged");
        li.append(el("span", { class: "mono" }, x.name), x.depth === null ? el("span", { class: "warn" }, sentence(x.error || "unknown"))
          : el("strong", {}, x.depth + (unacked ? " held" : " waiting")));
        return li;
      }));
      const w = $("#workers");
      if (r.data.workers.length) {
        w.replaceChildren(...r.data.workers.map((x) => {
          const li = el("li");
          li.append(el("span", { class: "mono" }, x.name), el("span", {}, x.active_tasks ? x.active_tasks + " task(s) running" : "idle"));
          return li;
        }));
      } else {
        w.replaceChildren(el("li", { class: "muted" }, r.data.workers_error ? sentence(r.data.workers_error) : "No worker answered. Jobs wait until a worker starts."));
      }
      $("#workers-count").textContent = "(" + r.data.workers.length + ")";
      $("#workers-checked").textContent = "Checked " + fmtTime(r.data.checked_at);
    }

    function drawChart(points) {
      const W = 640, H = 220, L = 36, R = 44, T = 10, B = 28;
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", "0 0 " + W + " " + H);
      svg.setAttribute("class", "chart");
      svg.setAttribute("role", "img");
      const maxJobs = Math.max(2, Math.ceil(Math.max(...points.map((p) => p.finished)) / 2) * 2);  // even: integer mid tick
      const lats = points.map((p) => p.median_latency_s).filter((x) => x !== null);
      const maxLat = Math.max(1, ...lats);
      const bw = (W - L - R) / points.length;
      const y = (v) => T + (H - T - B) * (1 - v / maxJobs);
      const yl = (v) => T + (H - T - B) * (1 - v / maxLat);
      const add = (tag, attrs, text) => {
        const e = document.createElementNS(SVG, tag);
        Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
        if (text !== undefined) e.textContent = text;
        svg.append(e);
        return e;
      };
      [0, 0.5, 1].forEach((f) => {
        add("line", { class: "gridline", x1: L, x2: W - R, y1: y(maxJobs * f), y2: y(maxJobs * f) });
        add("text", { x: L - 4, y: y(maxJobs * f) + 4, "text-anchor": "end" }, String(Math.round(maxJobs * f)));
        add("text", { x: W - R + 4, y: yl(maxLat * f) + 4 }, fmtDur(maxLat * f));
      });
      const line = [];
      points.forEach((p, i) => {
        const x = L + i * bw;
        if (p.succeeded) add("rect", { class: "bar-jobs", x: x + 1, width: Math.max(1, bw - 2), y: y(p.succeeded), height: y(0) - y(p.succeeded) });
        if (p.failed) add("rect", { class: "bar-failed", x: x + 1, width: Math.max(1, bw - 2), y: y(p.succeeded + p.failed), height: y(0) - y(p.failed) });
        if (p.median_latency_s !== null) line.push([x + bw / 2, yl(p.median_latency_s)]);
        if (i % 4 === 0) {
          const h = new Date(p.hour);
          add("text", { x: x + bw / 2, y: H - 10, "text-anchor": "middle" }, String(h.getHours()).padStart(2, "0") + ":00");
        }
      });
      add("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) });
      if (line.length > 1) add("polyline", { class: "line-latency", points: line.map((p) => p.join(",")).join(" ") });
      line.forEach((p) => add("circle", { class: "dot-latency", cx: p[0], cy: p[1], r: 2.5 }));
      const total = points.reduce((a, p) => a + p.finished, 0);
      const failedN = points.reduce((a, p) => a + p.failed, 0);
      const summary = total + " jobs finished in the last 24 hours (" + failedN + " failed)" +
        (lats.length ? "; median latency per hour between " + fmtDur(Math.min(...lats)) + " and " + fmtDur(maxLat) : "") + ".";
      svg.setAttribute("aria-label", summary);
      $("#chart").replaceChildren(svg);
      $("#chart-summary").textContent = summary;
    }

    function refresh() { loadJobs(); loadStats(); loadWorkers(); }

    form.addEventListener("submit", (ev) => { ev.preventDefault(); cursors = [null]; tbody.dataset.sig = ""; loadJobs(); });
    form.addEventListener("reset", () => setTimeout(() => { cursors = [null]; tbody.dataset.sig = ""; loadJobs(); }, 0));
    $("#f-status").addEventListener("change", () => { cursors = [null]; loadJobs(); });
    older.addEventListener("click", () => { if (nextCursor) { cursors.push(nextCursor); loadJobs(); } });
    newer.addEventListener("click", () => { if (cursors.length > 1) { cursors.pop(); loadJobs(); } });
    refresh();
    setInterval(() => {
      if (document.hidden || !$("#auto-refresh").checked) return;
      refresh();
    }, 5000);
  }

  // =============================================================================================================
  // Job page
  function jobPage() {
    const id = document.body.dataset.jobId;
    const retry = $("#job-retry"), cancel = $("#job-cancel");
    let job = null, timer = null, overlayFor = null;

    function step(title, at, cls, extra) {
      const li = el("li", { class: cls });
      li.append(el("strong", {}, title), document.createTextNode(" "), el("span", {}, at ? fmtTime(at) : "not yet"));
      if (extra) li.append(el("div", { class: "dur" }, extra));
      return li;
    }

    function render(j) {
      job = j;
      const s = $("#job-status");
      s.className = "badge " + j.status;
      s.textContent = j.status;
      const tl = $("#timeline");
      const d = j.durations || {};
      // timestamped events in time order (a retry resets the run's timestamps, so they follow the retry), then
      // the steps still to come
      const events = [{ t: j.created_at, li: step("Queued", j.created_at, "done", j.queue ? "queue " + j.queue : null) }];
      (j.admin_actions || []).forEach((a) => {
        const was = "was " + a.from_status + (a.previous_attempts ? " after " + a.previous_attempts + " attempt(s)" : "") +
          (a.previous_worker ? " on " + a.previous_worker : "") + (a.previous_error ? ": " + a.previous_error.slice(0, 240) : "");
        events.push({ t: a.at, li: step((a.action === "retry" ? "Retried by " : "Cancelled by ") + a.by, a.at,
          a.action === "retry" ? "done" : "bad", was) });
      });
      if (j.dispatched_at) events.push({ t: j.dispatched_at, li: step("Sent to the workers", j.dispatched_at, "done") });
      const pending = [];
      const running = step("Running", j.started_at, j.started_at ? "done" : "pending",
        j.started_at ? "waited " + fmtDur(d.waiting_s) + (j.worker ? " · worker " + j.worker : "") : null);
      if (j.started_at) events.push({ t: j.started_at, li: running }); else if (j.status !== "cancelled") pending.push(running);
      if (j.status === "running" && j.heartbeat_at) events.push({ t: j.heartbeat_at, li: step("Last heartbeat", j.heartbeat_at, "pending", j.progress + " % done") });
      const fin = TERMINAL.has(j.status);
      const finished = step(fin ? "Finished: " + j.status : "Finished", fin ? j.finished_at : null,
        !fin ? "pending" : j.status === "succeeded" ? "done" : "bad",
        fin ? (j.started_at ? "ran " + fmtDur(d.running_s) + " · " : "") + "total " + fmtDur(d.total_s) : null);
      if (fin && j.finished_at) events.push({ t: j.finished_at, li: finished }); else pending.push(finished);
      events.sort((a, b) => new Date(a.t) - new Date(b.t));
      const items = events.map((e) => e.li).concat(pending);
      tl.replaceChildren(...items);
      const dl = $("#details");
      const kv = [["File", j.input.name || "–"], ["Format", j.input.format + ", " + j.input.width + "×" + j.input.height + " px, " + j.input.size + " bytes"],
        [j.retries || (j.admin_actions || []).some((a) => a.action === "retry") ? "Attempts since the last retry" : "Attempts", String(j.attempts)],
        ["Retries", j.retries ? j.retries + (j.previous_error ? " · the run before ended: " + j.previous_error.slice(0, 240) : "") : "none"], ["Worker", j.worker || "–"], ["Queue", j.queue], ["Batch", j.batch_id || "–"],
        ["Token", j.token || "–"], ["Infected fraction", j.infected_fraction === null ? "–" : (j.infected_fraction * 100).toFixed(2) + " %"],
        ["Updated", fmtTime(j.updated_at)], ["Input SHA-256", j.input.sha256]];
      dl.replaceChildren(...kv.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { class: k === "Input SHA-256" || k === "Batch" ? "mono" : "" }, v)]));
      $("#job-error").textContent = j.error || "–";
      retry.hidden = !(j.status === "failed" || j.status === "cancelled");
      cancel.hidden = !(j.status === "queued" || j.status === "running");
      retry.disabled = cancel.disabled = false;
      if (j.status === "succeeded" && j.links.overlay && overlayFor !== j.id + j.finished_at) {
        overlayFor = j.id + j.finished_at;
        api("GET", "/jobs/" + j.id + "/results/overlay", true).then((r) => {
          if (r.ok) { $("#job-overlay").src = URL.createObjectURL(r.data); $("#result-panel").hidden = false; }
        });
      }
      if (j.status !== "succeeded") $("#result-panel").hidden = true;
    }

    async function load() {
      const r = await api("GET", "/jobs/" + id);
      if (!r.ok) { pageError.textContent = r.status === 404 ? "There is no job with this id." : "The job could not be loaded. " + errorSentence(r.status, r.data); return; }
      pageError.textContent = "";
      render(r.data);
      clearTimeout(timer);
      timer = setTimeout(load, TERMINAL.has(r.data.status) ? 10000 : 1500);
    }
    retry.addEventListener("click", () => { retry.disabled = true; act(job, "retry", load); });
    cancel.addEventListener("click", () => { cancel.disabled = true; act(job, "cancel", load); });
    if (id) load(); else pageError.textContent = "This is not a job id.";
  }

  if (document.body.dataset.page === "dashboard") dashboard();
  if (document.body.dataset.page === "job") jobPage();
})();
