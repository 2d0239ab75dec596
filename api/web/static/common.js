// covidseg pages: the few helpers every page script shares (app.js, studies.js, admin.js). Loaded first by
// web_base.html; exposes window.covidsegUI. No framework, no build step.
"use strict";
window.covidsegUI = (function () {
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const TOKEN_KEY = "covidseg.apiToken";      // the public pages' bearer token, per tab (sessionStorage)
  const $ = (sel, root) => (root || document).querySelector(sel);

  /** An API message as a sentence: capital first letter, final punctuation. */
  function sentence(text) {
    text = String(text || "").trim();
    if (!text) return "";
    text = text.charAt(0).toUpperCase() + text.slice(1);
    return /[.!?]$/.test(text) ? text : text + ".";
  }
  /** A new element with attributes (null/undefined ones skipped) and text content. */
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => { if (v !== undefined && v !== null) e.setAttribute(k, v); });
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  return Object.freeze({ TERMINAL, TOKEN_KEY, $, sentence, el, token });
})();
