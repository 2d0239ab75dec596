// covidseg upload page: talks only to the public REST API (/api/v1) with the bearer token of this tab.
// No framework, no build step. The token lives in sessionStorage: gone when the tab closes, never in a cookie,
// so the API can not be driven by another site (no ambient credentials, hence no CSRF on the public API).
"use strict";
(function () {
  const body = document.body;
  const API = body.dataset.api || "/api/v1";
  const MAX_BYTES = parseInt(body.dataset.maxUploadBytes || "0", 10) || Infinity;
  const MAX_FILES = parseInt(body.dataset.maxFiles || "0", 10) || Infinity;
  const { TERMINAL, TOKEN_KEY, $, sentence, token } = window.covidsegUI;    // common.js

  // ---------------------------------------------------------------------------------------------------------
  // API access and error sentences

  /** A plain sentence for an API answer that is not a success. */
  function errorSentence(status, data, what) {
    const msg = data && typeof data.error === "string" ? data.error
      : data && data.error && data.error.message ? data.error.message : "";
    switch (status) {
      case 0: return "The server could not be reached. Check the network connection and try again.";
      case 401: return "The API token was not accepted. Enter a valid token and try again.";
      case 403: return "This token may not do that. Ask your administrator for access.";
      case 404: return (what || "The item") + " was not found. It may belong to another token or have been removed.";
      case 413: return msg ? sentence("The upload is too large: " + msg)
        : "The upload is too large. Send fewer or smaller files.";
      case 429: return "The service is busy. Wait a moment and try again.";
      case 502: case 503: case 504:
        return msg ? sentence("The service is temporarily unavailable: " + msg)
          : "The service is temporarily unavailable. Try again in a minute.";
    }
    if (msg) return sentence(msg);
    if (status >= 500) return "The server had an unexpected problem. Try again, and tell your administrator if it persists.";
    return "The request was refused (HTTP " + status + ").";
  }

  async function api(method, path, opts) {
    opts = opts || {};
    const headers = Object.assign({ "Authorization": "Bearer " + token(), "Accept": "application/json" },
      opts.headers || {});
    let resp;
    try {
      resp = await fetch(path.startsWith("/") ? path : API + "/" + path, {
        method, headers, body: opts.body, cache: "no-store", credentials: "omit",
      });
    } catch (e) {
      return { ok: false, status: 0, data: null };
    }
    let data = null;
    if (opts.blob && resp.ok) {
      data = await resp.blob();
    } else {
      try { data = await resp.json(); } catch (e) { data = null; }
    }
    return { ok: resp.ok, status: resp.status, data };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Token panel
  const tokenPanel = $("#token-panel"), tokenForm = $("#token-form"), tokenInput = $("#token-input");
  const tokenError = $("#token-error"), tokenStatus = $("#token-status");
  const dropzone = $("#dropzone"), fileInput = $("#file-input"), uploadError = $("#upload-error");

  function setAuthorised(on) {
    tokenPanel.hidden = on;
    tokenStatus.hidden = !on;
    dropzone.setAttribute("aria-disabled", on ? "false" : "true");
  }

  tokenForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    tokenError.textContent = "";
    const value = tokenInput.value.trim();
    if (!value) { tokenError.textContent = "Enter the API token first."; tokenInput.focus(); return; }
    sessionStorage.setItem(TOKEN_KEY, value);
    const r = await api("GET", "jobs?limit=1");
    if (!r.ok) {
      sessionStorage.removeItem(TOKEN_KEY);
      tokenError.textContent = errorSentence(r.status, r.data);
      tokenInput.focus();
      return;
    }
    tokenInput.value = "";
    setAuthorised(true);
    dropzone.focus();
    resumeFromHash();
  });

  $("#token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    setAuthorised(false);
    tokenInput.focus();
  });

  function needToken() {
    if (token()) return false;
    setAuthorised(false);
    tokenError.textContent = "Enter your API token to upload slices.";
    tokenInput.focus();
    return true;
  }

  // ---------------------------------------------------------------------------------------------------------
  // Drop zone: click, Enter/Space, drag and drop
  function openPicker() {
    if (needToken()) return;
    fileInput.click();
  }
  dropzone.addEventListener("click", openPicker);
  dropzone.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " " || ev.key === "Spacebar") { ev.preventDefault(); openPicker(); }
  });
  ["dragenter", "dragover"].forEach((t) => dropzone.addEventListener(t, (ev) => {
    ev.preventDefault();
    dropzone.classList.add("dragover");
    if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
  }));
  ["dragleave", "dragend"].forEach((t) => dropzone.addEventListener(t, () => dropzone.classList.remove("dragover")));
  dropzone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    dropzone.classList.remove("dragover");
    const files = ev.dataTransfer ? Array.from(ev.dataTransfer.files || []) : [];
    if (needToken()) return;
    submit(files);
  });
  // A file dropped next to the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  fileInput.addEventListener("change", () => {
    const files = Array.from(fileInput.files || []);
    fileInput.value = "";
    submit(files);
  });

  // ---------------------------------------------------------------------------------------------------------
  // Upload list
  const list = $("#files");
  const rows = new Map();      // job id -> row
  let current = null;          // row shown in the viewer

  function fmtBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(0) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }
  function fmtFraction(f) {
    if (f === null || f === undefined) return "–";
    const pct = f * 100;
    return (pct < 0.1 && pct > 0 ? pct.toFixed(3) : pct.toFixed(1)) + " %";
  }

  function makeRow(name, size, file) {
    const li = document.createElement("li");
    li.innerHTML = '<span class="name"></span><span class="badge uploading">uploading</span>' +
      '<div class="bar" aria-hidden="true"><span></span></div>' +
      '<div class="meta"><span class="size"></span><span class="pct"></span>' +
      '<span class="frac"></span><button type="button" class="btn small secondary view" hidden>View</button></div>' +
      '<div class="err" role="alert"></div>';
    $(".name", li).textContent = name || "(unnamed)";
    $(".name", li).title = name || "";
    $(".size", li).textContent = size ? fmtBytes(size) : "";
    const row = { li, name, size, file, id: null, job: null, objectURL: null };
    $(".view", li).addEventListener("click", () => openRow(row, true));
    list.prepend(li);
    return row;
  }

  function setUpload(row, fraction) {
    const pct = Math.round(Math.max(0, Math.min(1, fraction)) * 100);
    $(".bar > span", row.li).style.width = pct + "%";
    $(".pct", row.li).textContent = "Upload " + pct + " %";
  }

  const announcer = $("#announce");
  function announce(text) { announcer.textContent = text; }

  function setStatus(row, job) {
    const was = row.job && row.job.status;
    row.job = Object.assign(row.job || {}, job);
    const st = row.job.status;
    if (st !== was && TERMINAL.has(st)) announce((row.name || "The slice") + ": " + st + ".");
    const badge = $(".badge", row.li);
    badge.className = "badge " + st;
    badge.textContent = st;
    if (st === "running" || st === "queued") {
      $(".pct", row.li).textContent = st === "queued" ? "Waiting in the queue" : "Segmenting " + (job.progress || 0) + " %";
      $(".bar > span", row.li).style.width = (st === "queued" ? 100 : Math.max(5, job.progress || 0)) + "%";
    } else if (st === "succeeded") {
      $(".pct", row.li).textContent = "Done";
      $(".bar > span", row.li).style.width = "100%";
    } else if (st === "failed") {
      $(".pct", row.li).textContent = "Failed";
    } else if (st === "cancelled") {
      $(".pct", row.li).textContent = "Cancelled";
    }
    if (row.job.infected_fraction !== null && row.job.infected_fraction !== undefined) {
      $(".frac", row.li).textContent = "Infected " + fmtFraction(row.job.infected_fraction);
    }
    $(".err", row.li).textContent = st === "failed" && row.job.error
      ? "The slice could not be segmented: " + sentence(row.job.error) : "";
    $(".view", row.li).hidden = st !== "succeeded";
    row.li.dataset.status = st;
    row.li.dataset.jobId = row.id || "";
    if (current === row) renderViewerMeta(row);
    if (st === "succeeded" && (!current || (current.job && current.job.status !== "succeeded"))) openRow(row, false);
  }

  function rowError(row, text) {
    const badge = $(".badge", row.li);
    badge.className = "badge rejected";
    badge.textContent = "not uploaded";
    $(".err", row.li).textContent = text;
    $(".pct", row.li).textContent = "";
  }

  // ---------------------------------------------------------------------------------------------------------
  // Submission: one multipart request (several files = one batch); per-file progress from the byte offsets
  function submit(files) {
    uploadError.textContent = "";
    if (!files.length) return;
    if (files.length > MAX_FILES) {
      uploadError.textContent = "You chose " + files.length + " files; at most " + MAX_FILES +
        " can be sent at once. Choose fewer files.";
      return;
    }
    const good = [];
    for (const f of files) {
      if (f.size > MAX_BYTES) {
        const r = makeRow(f.name, f.size, null);
        rowError(r, f.name + " is larger than the " + fmtBytes(MAX_BYTES) + " limit and was not uploaded.");
      } else if (f.size === 0) {
        const r = makeRow(f.name, f.size, null);
        rowError(r, f.name + " is empty and was not uploaded.");
      } else {
        good.push(f);
      }
    }
    if (!good.length) return;
    const batchRows = good.map((f) => makeRow(f.name, f.size, f));
    send(good, batchRows, newKey());
  }

  /** A random Idempotency-Key. crypto.randomUUID needs HTTPS or localhost; getRandomValues works everywhere. */
  function newKey() {
    if (window.crypto && crypto.randomUUID && window.isSecureContext) return crypto.randomUUID();
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }

  function send(files, batchRows, key) {
    const fd = new FormData();
    files.forEach((f) => fd.append("file", f, f.name));
    const sizes = files.map((f) => f.size);
    const payload = sizes.reduce((a, b) => a + b, 0);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", API + "/jobs");
    xhr.setRequestHeader("Authorization", "Bearer " + token());
    xhr.setRequestHeader("Idempotency-Key", key);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (ev) => {
      if (!ev.lengthComputable) return;
      // Spread the multipart overhead evenly over the files, then map the bytes sent onto each file's range.
      const overhead = Math.max(0, ev.total - payload) / files.length;
      let start = 0;
      batchRows.forEach((row, i) => {
        const span = sizes[i] + overhead;
        setUpload(row, (ev.loaded - start) / span);
        start += span;
      });
    });
    xhr.addEventListener("load", () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { data = null; }
      if (xhr.status === 202 || xhr.status === 200) {
        accepted(data, batchRows);
      } else {
        failed(xhr.status, data, files, batchRows, key);
      }
    });
    xhr.addEventListener("error", () => failed(0, null, files, batchRows, key));
    xhr.addEventListener("timeout", () => failed(0, null, files, batchRows, key));
    batchRows.forEach((r) => setUpload(r, 0));
    xhr.send(fd);
  }

  function failed(status, data, files, batchRows, key) {
    let text = errorSentence(status, data);
    if (files.length > 1 && status >= 400 && status < 500 && status !== 401) {
      text = "None of the " + files.length + " files was uploaded. " + text + " Remove that file and send the others again.";
    } else if (status >= 400 && status < 500 && status !== 401) {
      text = "The file was not uploaded. " + text;
    }
    uploadError.textContent = text;
    batchRows.forEach((r) => rowError(r, ""));
    if (status === 0 || status >= 500) {
      // Same Idempotency-Key: if the first attempt did reach the server, the retry returns its jobs.
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "btn small";
      btn.textContent = "Try again";
      btn.addEventListener("click", () => { uploadError.textContent = ""; batchRows.forEach((r) => r.li.remove()); send(files, batchRows.map((r) => makeRow(r.name, r.size, r.file)), key); });
      uploadError.append(" ", btn);
    }
    if (status === 401) { setAuthorised(false); tokenError.textContent = text; }
  }

  function accepted(data, batchRows) {
    const jobs = (data && data.jobs) || [];
    jobs.forEach((j, i) => {
      const row = batchRows[i];
      if (!row) return;
      row.id = j.id;
      rows.set(j.id, row);
      setStatus(row, { status: j.status || "queued", progress: 0 });
    });
    if (data && data.batch_id) {
      showBatch(data.batch_id);
      history.replaceState(null, "", "#batch=" + data.batch_id);
      pollBatch(data.batch_id);
    } else if (jobs.length === 1) {
      history.replaceState(null, "", "#job=" + jobs[0].id);
      pollJob(rows.get(jobs[0].id));
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Live status: a single job polls GET /jobs/<id>; a batch polls GET /batches/<id> and lists its jobs.
  function delay(ms) { return new Promise((r) => setTimeout(r, ms)); }
  function interval(started) { const t = (Date.now() - started) / 1000; return t < 30 ? 1000 : t < 120 ? 2000 : 4000; }

  async function pollJob(row) {
    const started = Date.now();
    while (row && row.id) {
      const r = await api("GET", "jobs/" + row.id);
      if (r.ok) {
        setStatus(row, r.data);
        if (TERMINAL.has(r.data.status)) return;
      } else if (r.status === 401 || r.status === 404) {
        $(".err", row.li).textContent = errorSentence(r.status, r.data, "The job");
        return;
      }
      await delay(interval(started));
    }
  }

  const batchPanel = $("#batch-panel");
  function showBatch(id) {
    batchPanel.hidden = false;
    $("#batch-id").textContent = id;
  }
  function renderBatch(b) {
    const pct = b.percent_done !== undefined ? b.percent_done : 0;
    $("#batch-bar").style.width = pct + "%";
    $("#batch-percent").textContent = (Math.round(pct * 10) / 10) + " % (" +
      ["succeeded", "failed", "cancelled"].reduce((a, s) => a + (b.counts[s] || 0), 0) + " of " + b.total + ")";
    const c = $("#batch-counts");
    c.replaceChildren();
    ["queued", "running", "succeeded", "failed", "cancelled"].forEach((s) => {
      const span = document.createElement("span");
      span.innerHTML = '<span class="badge ' + s + '"></span> ';
      span.firstChild.textContent = s;
      span.append(String(b.counts[s] || 0));
      c.append(span);
    });
  }

  async function listBatchJobs(batchId) {
    let cursor = null;
    const out = [];
    for (let page = 0; page < 20; page++) {
      const r = await api("GET", "jobs?limit=200&batch_id=" + batchId + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      if (!r.ok) return { error: r };
      out.push(...r.data.jobs);
      cursor = r.data.next_cursor;
      if (!cursor) break;
    }
    return { jobs: out };
  }

  async function pollBatch(batchId) {
    const started = Date.now();
    const seen = new Map();   // job id -> status last rendered
    while (true) {
      const r = await api("GET", "batches/" + batchId);
      if (!r.ok) {
        uploadError.textContent = errorSentence(r.status, r.data, "The batch");
        if (r.status === 401 || r.status === 404) return;
      } else {
        renderBatch(r.data);
        const changed = (r.data.jobs || []).some((j) => seen.get(j.id) !== j.status);
        if (changed) {
          const l = await listBatchJobs(batchId);
          (l.jobs || []).sort((a, b) => b.position - a.position).forEach((j) => {
            let row = rows.get(j.id);
            if (!row) { row = makeRow(j.input && j.input.name, j.input && j.input.size, null); row.id = j.id; rows.set(j.id, row); }
            setStatus(row, j);
            seen.set(j.id, j.status);
          });
        }
        if (r.data.done) return;
      }
      await delay(interval(started));
    }
  }

  async function resumeFromHash() {
    const m = /^#(job|batch)=([0-9a-f]{32})$/.exec(location.hash);
    if (!m || !token()) return;
    if (m[1] === "batch") {
      if ([...rows.values()].some((r) => r.job && r.job.batch_id === m[2])) return;
      showBatch(m[2]);
      pollBatch(m[2]);
    } else {
      openJobById(m[2]);
    }
  }

  async function openJobById(id) {
    let row = rows.get(id);
    if (!row) {
      const r = await api("GET", "jobs/" + id);
      if (!r.ok) { uploadError.textContent = errorSentence(r.status, r.data, "The job"); return; }
      row = makeRow(r.data.input && r.data.input.name, r.data.input && r.data.input.size, null);
      row.id = id;
      rows.set(id, row);
      setStatus(row, r.data);
      if (!TERMINAL.has(r.data.status)) pollJob(row);
    }
    openRow(row, true);
  }

  $("#open-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    uploadError.textContent = "";
    if (needToken()) return;
    const id = $("#open-id").value.trim().toLowerCase();
    if (!/^[0-9a-f]{32}$/.test(id)) { uploadError.textContent = "A job id has 32 characters 0-9 and a-f."; return; }
    history.replaceState(null, "", "#job=" + id);
    openJobById(id);
  });

  // ---------------------------------------------------------------------------------------------------------
  // Viewer: original (the local file, when the browser can show it) / overlay / mask, with an opacity slider
  const imgBase = $("#img-base"), imgTop = $("#img-top"), placeholder = $("#viewer-placeholder");
  const opacity = $("#opacity"), viewerError = $("#viewer-error");
  const views = Array.from(document.querySelectorAll('input[name="view"]'));
  const downloads = Array.from(document.querySelectorAll("[data-download]"));
  const blobs = {};            // job id -> {mask: objectURL, overlay: ..., probability: ...}

  function renderViewerMeta(row) {
    const j = row.job || {};
    $("#viewer-name").textContent = row.name ? "– " + row.name : "";
    $("#fraction").textContent = j.status === "succeeded" ? fmtFraction(j.infected_fraction) : "–";
  }

  async function resultURL(row, kind) {
    const cache = blobs[row.id] || (blobs[row.id] = {});
    if (cache[kind]) return cache[kind];
    const link = row.job && row.job.links && row.job.links[kind];
    if (!link) throw { status: 404 };
    const r = await api("GET", link, { blob: true, headers: { Accept: "image/png" } });
    if (!r.ok) throw r;
    cache[kind] = URL.createObjectURL(r.data);
    return cache[kind];
  }

  function originalURL(row) {
    if (row.objectURL !== null) return row.objectURL;
    const f = row.file;
    row.objectURL = f && /^image\/(png|jpeg|gif|webp|bmp)$/.test(f.type) ? URL.createObjectURL(f) : "";
    return row.objectURL;
  }

  async function openRow(row, focus) {
    if (!row || !row.job || row.job.status !== "succeeded") return;
    if (current) current.li.classList.remove("selected");
    current = row;
    row.li.classList.add("selected");
    viewerError.textContent = "";
    renderViewerMeta(row);
    const orig = originalURL(row);
    views.forEach((v) => { v.disabled = false; });
    $("#view-original").disabled = !orig;
    $("#view-original + label").title = orig ? "" : "The original is shown only for PNG/JPEG files uploaded from this tab";
    opacity.disabled = false;
    try {
      await Promise.all([resultURL(row, "overlay"), resultURL(row, "mask")]);
    } catch (r) {
      viewerError.textContent = "The results could not be loaded. " + errorSentence(r.status, r.data, "The result");
      return;
    }
    if (current !== row) return;
    downloads.forEach((b) => { b.disabled = false; });
    render();
    if (focus) $("#viewer").scrollIntoView({ block: "nearest" });
  }

  function selectedView() { const v = views.find((x) => x.checked); return v ? v.value : "overlay"; }

  function render() {
    const row = current;
    if (!row || !blobs[row.id]) return;
    const view = selectedView();
    const orig = originalURL(row);
    const b = blobs[row.id];
    placeholder.hidden = true;
    // Base layer: the original slice when we have it; otherwise the overlay (which contains the slice).
    imgBase.src = orig || b.overlay;
    imgBase.alt = orig ? "Original CT slice" : "CT slice with infection overlay";
    imgBase.hidden = false;
    imgBase.dataset.kind = orig ? "original" : "overlay";
    const op = opacity.value / 100;
    $("#opacity-value").textContent = opacity.value + " %";
    if (view === "original") {
      imgTop.hidden = true;
      imgTop.dataset.kind = "";
      if (!orig) { imgBase.style.opacity = 1; }
    } else {
      imgTop.src = b[view];
      imgTop.alt = view === "mask" ? "Predicted infection mask" : "Infection overlay";
      imgTop.dataset.kind = view;
      imgTop.hidden = false;
      imgTop.style.opacity = op;
    }
    $("#stage").dataset.view = view;
  }

  views.forEach((v) => v.addEventListener("change", render));
  opacity.addEventListener("input", render);

  downloads.forEach((btn) => btn.addEventListener("click", async () => {
    const row = current;
    if (!row) return;
    const kind = btn.dataset.download;
    viewerError.textContent = "";
    try {
      const url = await resultURL(row, kind);
      const stem = (row.name || row.id).replace(/\.[^.]+$/, "").replace(/[^\w.-]+/g, "_") || row.id;
      const a = document.createElement("a");
      a.href = url;
      a.download = stem + "_" + kind + ".png";
      document.body.append(a);
      a.click();
      a.remove();
    } catch (r) {
      viewerError.textContent = "The " + kind + " could not be downloaded. " + errorSentence(r.status, r.data, "The result");
    }
  }));

  // ---------------------------------------------------------------------------------------------------------
  setAuthorised(!!token());
  resumeFromHash();
  window.addEventListener("hashchange", resumeFromHash);
})();
