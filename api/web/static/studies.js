// covidseg whole studies: the public page /studies (bearer token of this tab, /api/v1/studies) and the admin page
// /admin/studies (session cookie + X-CSRF-Token, /api/v1/admin/studies). No framework, no build step.
"use strict";
(function () {
  const body = document.body;
  const ADMIN = body.dataset.mode === "admin";
  const API = body.dataset.api || (ADMIN ? "/api/v1/admin" : "/api/v1");
  const CSRF = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const MAX_BYTES = parseInt(body.dataset.maxUploadBytes || "0", 10) || Infinity;
  const { TERMINAL, TOKEN_KEY, $, sentence, el, token } = window.covidsegUI;    // common.js

  function errorSentence(status, data) {
    const msg = data && typeof data.error === "string" ? data.error : "";
    if (status === 0) return "The server could not be reached. Check the network connection and try again.";
    if (status === 401) return ADMIN ? "Your admin session has ended. Reload the page to log in again."
      : "The API token was not accepted. Enter a valid token and try again.";
    if (status === 413) return msg ? sentence("The upload is too large: " + msg) : "The upload is too large.";
    if (status >= 500 && !msg) return "The server had a problem answering. Try again in a moment.";
    return msg ? sentence(msg) : "The request was refused (HTTP " + status + ").";
  }
  function authHeaders(method) {
    const h = { Accept: "application/json" };
    if (ADMIN) { if (method !== "GET") { h["X-CSRF-Token"] = CSRF; h["Content-Type"] = "application/json"; } }
    else h.Authorization = "Bearer " + token();
    return h;
  }
  async function api(method, path, blob) {
    let resp;
    try {
      resp = await fetch(path.startsWith("/") ? path : API + "/" + path, {
        method, headers: authHeaders(method), cache: "no-store",
        credentials: ADMIN ? "same-origin" : "omit", body: method === "GET" ? undefined : (ADMIN ? "{}" : undefined),
      });
    } catch (e) { return { ok: false, status: 0, data: null }; }
    let data = null;
    if (blob && resp.ok) data = await resp.blob();
    else { try { data = await resp.json(); } catch (e) { data = null; } }
    if (ADMIN && resp.status === 401) location.href = "/admin/login?next=" + encodeURIComponent(location.pathname);
    return { ok: resp.ok, status: resp.status, data };
  }
  function fmtTime(iso) {
    return iso ? new Date(iso).toLocaleString(undefined, { year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit" }) : "–";
  }
  function fmtNum(v, digits, unit) {
    return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits) + (unit || "");
  }
  const announcer = $("#announce");
  function announce(text) { if (announcer) announcer.textContent = text; }

  // ---------------------------------------------------------------------------------------------------------
  // Token (public page only)
  const tokenPanel = $("#token-panel"), tokenStatus = $("#token-status");
  function setAuthorised(on) {
    if (tokenPanel) tokenPanel.hidden = on;
    if (tokenStatus) tokenStatus.hidden = !on;
  }
  if (!ADMIN) {
    $("#token-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const input = $("#token-input"), err = $("#token-error");
      err.textContent = "";
      const value = input.value.trim();
      if (!value) { err.textContent = "Enter the API token first."; input.focus(); return; }
      sessionStorage.setItem(TOKEN_KEY, value);
      const r = await api("GET", "studies?limit=1");
      if (!r.ok) { sessionStorage.removeItem(TOKEN_KEY); err.textContent = errorSentence(r.status, r.data); return; }
      input.value = "";
      setAuthorised(true);
      refresh();
    });
    $("#token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      setAuthorised(false);
      list.textContent = "";
      rows.clear();
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // Upload (public page only): one XHR for upload progress; an Idempotency-Key per chosen set of files, so
  // pressing the button again after a lost answer returns the same study instead of a second one.
  function newKey() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return "web-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }
  if (!ADMIN) {
    const form = $("#study-form"), input = $("#study-files"), bar = $("#upload-bar");
    const status = $("#upload-status"), error = $("#upload-error"), button = $("#study-submit");
    let key = newKey();
    input.addEventListener("change", () => { key = newKey(); error.textContent = ""; });
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      error.textContent = "";
      if (!token()) { setAuthorised(false); $("#token-error").textContent = "Enter your API token first."; return; }
      const files = Array.from(input.files || []);
      if (!files.length) { error.textContent = "Choose the study's files first."; return; }
      const total = files.reduce((n, f) => n + f.size, 0);
      if (total > MAX_BYTES) { error.textContent = "The study is larger than the server accepts (" + Math.round(MAX_BYTES / 1048576) + " MB)."; return; }
      const fd = new FormData();
      files.forEach((f) => fd.append("file", f, f.name));
      const uid = $("#series-uid").value.trim();
      if (uid) fd.append("series_uid", uid);
      const xhr = new XMLHttpRequest();
      xhr.open("POST", API + "/studies");
      xhr.setRequestHeader("Authorization", "Bearer " + token());
      xhr.setRequestHeader("Idempotency-Key", key);
      xhr.setRequestHeader("Accept", "application/json");
      bar.hidden = false;
      button.disabled = true;
      $("span", bar).style.width = "0%";
      xhr.upload.addEventListener("progress", (e) => {
        if (!e.lengthComputable) return;
        const pct = Math.round((100 * e.loaded) / e.total);
        $("span", bar).style.width = pct + "%";
        status.textContent = pct < 100 ? "Uploading: " + pct + " %" : "Checking and de-identifying the study …";
      });
      xhr.addEventListener("loadend", () => {
        button.disabled = false;
        bar.hidden = true;
        let data = null;
        try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
        if (xhr.status === 202 || xhr.status === 200) {
          status.textContent = xhr.status === 200 ? "This upload was already accepted: study " + data.id.slice(0, 8) + "."
            : "Study " + data.id.slice(0, 8) + " accepted (" + data.n_slices + " slices), queued.";
          announce(status.textContent);
          form.reset();
          key = newKey();
          refresh();
        } else {
          status.textContent = "";
          error.textContent = "The study was not accepted. " + errorSentence(xhr.status, data);
        }
      });
      xhr.send(fd);
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // The list: one <li> per study, updated in place while studies are active.
  const list = $("#studies"), empty = $("#studies-empty"), listError = $("#list-error");
  const rows = new Map();
  const summaries = new Map();      // study id -> object URL of its summary picture (fetched once)
  let timer = null, cursor = null, older = [], page = 0;

  async function download(link, name) {
    const r = await api("GET", link, true);
    if (!r.ok) { listError.textContent = "The file could not be downloaded. " + errorSentence(r.status, r.data); return; }
    const url = URL.createObjectURL(r.data);
    const a = el("a", { href: url, download: name });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 30000);
  }

  async function act(study, action) {
    listError.textContent = "";
    const r = await api("POST", study.links[action]);
    if (!r.ok) listError.textContent = "The study could not be " + (action === "retry" ? "retried. " : "cancelled. ") + errorSentence(r.status, r.data);
    else announce("Study " + study.id.slice(0, 8) + (action === "retry" ? " was queued again." : " was cancelled."));
    refresh();
  }

  function makeRow(study) {
    const li = el("li", { class: "study", "data-id": study.id });
    const head = el("header");
    head.append(el("strong", { class: "mono" }, study.id.slice(0, 8)), el("span", { class: "badge" }),
      el("span", { class: "muted small meta" }));
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
      "aria-label": "Progress of study " + study.id.slice(0, 8) });
    bar.append(el("span"));
    const dl = el("dl");
    const summary = el("div", { class: "summary" });
    const err = el("p", { class: "err-text small", role: "alert" });
    const actions = el("div", { class: "actions", role: "group", "aria-label": "Study actions" });
    li.append(head, bar, dl, summary, err, actions);
    return li;
  }

  function pct(v) { return v === null || v === undefined ? "–" : fmtNum(v, 1, " %"); }

  function render(li, study) {
    const badge = $(".badge", li);
    badge.className = "badge " + study.status;
    badge.textContent = study.status;
    $(".meta", li).textContent = [study.n_slices + " slices", study.format === "nifti" ? "NIfTI" : "DICOM",
      "created " + fmtTime(study.created_at), ADMIN && study.token ? "token " + study.token : null,
      study.attempts > 1 ? study.attempts + " attempts" : null].filter(Boolean).join(" · ");
    const bar = $(".bar", li);
    const progress = study.status === "succeeded" ? 100 : study.progress || 0;
    bar.hidden = study.status === "succeeded" || study.status === "cancelled";
    bar.setAttribute("aria-valuenow", String(Math.round(progress)));
    $("span", bar).style.width = Math.max(study.status === "running" ? 3 : 0, progress) + "%";
    const dl = $("dl", li);
    dl.textContent = "";
    const rep = study.report;
    const items = rep ? [
      ["CT severity score", rep.ct_score === null || rep.ct_score === undefined ? "–" : "CT-" + rep.ct_score],
      ["Lung involved", pct(rep.percent_involved)],
      ["Lesion volume", fmtNum(rep.lesion_volume_ml, 1, " mL")],
      ["Lung volume", fmtNum(rep.lung_volume_ml, 0, " mL")],
      ["Right lung involved", pct(rep.sides && rep.sides.right ? rep.sides.right.percent_involved : null)],
      ["Left lung involved", pct(rep.sides && rep.sides.left ? rep.sides.left.percent_involved : null)],
    ] : TERMINAL.has(study.status) ? [] : [["Progress", study.status === "queued" ? "waiting for the bulk worker"
      : pct(study.progress)]];
    if (ADMIN && study.worker) items.push(["Worker", study.worker]);
    items.forEach(([k, v]) => {
      dl.append(el("dt", {}, k));
      const dd = el("dd", k === "CT severity score" ? { class: "score" } : {}, v);
      dl.append(dd);
    });
    $(".err-text", li).textContent = study.status === "failed" && study.error ? sentence(study.error) : "";
    const summary = $(".summary", li);
    if (study.status === "succeeded" && !summaries.has(study.id)) {
      summaries.set(study.id, null);
      api("GET", study.links.summary, true).then((r) => {
        if (!r.ok) return;
        const url = URL.createObjectURL(r.data);
        summaries.set(study.id, url);
        summary.textContent = "";
        summary.append(el("img", { src: url, alt: "Summary of study " + study.id.slice(0, 8) +
          ": key slices with the infection overlay and the measured volumes" }));
      });
    }
    const actions = $(".actions", li);
    actions.textContent = "";
    const short = study.id.slice(0, 8);
    if (study.status === "succeeded") {
      [["report", "Report (JSON)", "study-" + short + "-report.json"],
       ["mask", "Infection mask (NIfTI)", "study-" + short + "-mask.nii.gz"],
       ["lung_mask", "Lung mask (NIfTI)", "study-" + short + "-lung_mask.nii.gz"],
       ["summary", "Summary (PNG)", "study-" + short + "-summary.png"],
       ["dicom_seg", "Segmentation (DICOM SEG)", "study-" + short + "-mask.seg.dcm"]].forEach(([k, label, name]) => {
        if (!study.links[k]) return;   // the DICOM SEG exists for DICOM input only
        const b = el("button", { type: "button", class: "btn secondary small" }, label);
        b.addEventListener("click", () => download(study.links[k], name));
        actions.append(b);
      });
    }
    if (!TERMINAL.has(study.status)) {
      const b = el("button", { type: "button", class: "btn danger small" }, "Cancel");
      b.addEventListener("click", () => { b.disabled = true; act(study, "cancel"); });
      actions.append(b);
    }
    if (study.status === "failed" || study.status === "cancelled") {
      const b = el("button", { type: "button", class: "btn small" }, "Retry");
      b.addEventListener("click", () => { b.disabled = true; act(study, "retry"); });
      actions.append(b);
    }
  }

  function query() {
    const p = new URLSearchParams({ limit: ADMIN ? "25" : "20" });
    if (ADMIN) {
      const st = $("#f-status").value, q = $("#f-q").value.trim();
      if (st) p.set("status", st);
      if (q) p.set("q", q.toLowerCase());
    }
    if (cursor) p.set("cursor", cursor);
    return "studies?" + p.toString();
  }

  async function refresh() {
    clearTimeout(timer);
    if (!ADMIN && !token()) { setAuthorised(false); return; }
    if (!ADMIN) setAuthorised(true);
    const r = await api("GET", query());
    if (!r.ok) {
      listError.textContent = "The studies could not be loaded. " + errorSentence(r.status, r.data);
      if (!ADMIN && r.status === 401) { sessionStorage.removeItem(TOKEN_KEY); setAuthorised(false); return; }
      timer = setTimeout(refresh, 10000);
      return;
    }
    listError.textContent = "";
    const studies = r.data.studies || [];
    const seen = new Set();
    studies.forEach((st, i) => {
      seen.add(st.id);
      let li = rows.get(st.id);
      if (!li) { li = makeRow(st); rows.set(st.id, li); }
      if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
      render(li, st);
    });
    for (const [id, li] of rows) if (!seen.has(id)) { li.remove(); rows.delete(id); }
    empty.hidden = studies.length > 0;
    if (ADMIN) {
      const c = r.data.counts || {};
      ["queued", "running", "failed", "succeeded"].forEach((s) => { $("#count-" + s).textContent = String(c[s] || 0); });
      $("#page-older").disabled = !r.data.next_cursor;
      $("#page-newer").disabled = page === 0;
      $("#page-label").textContent = "Page " + (page + 1);
      $("#page-older").dataset.next = r.data.next_cursor || "";
    }
    const active = studies.some((st) => !TERMINAL.has(st.status));
    timer = setTimeout(refresh, active ? 2000 : 15000);
  }

  if (ADMIN) {
    $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); cursor = null; older = []; page = 0; refresh(); });
    $("#filters").addEventListener("reset", () => { setTimeout(() => { cursor = null; older = []; page = 0; refresh(); }, 0); });
    $("#page-older").addEventListener("click", (ev) => {
      older.push(cursor); cursor = ev.currentTarget.dataset.next || null; page += 1; refresh();
    });
    $("#page-newer").addEventListener("click", () => { cursor = older.pop() || null; page = Math.max(0, page - 1); refresh(); });
  }
  refresh();
})();
