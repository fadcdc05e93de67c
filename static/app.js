// Small behaviours that need script. Every page works without it; htmx does the live parts.
// No inline script anywhere: the Content-Security-Policy is script-src 'self'.
"use strict";

(function () {
  const fmt = new Intl.NumberFormat();

  // -- the prompt's character count, against the limit ------------------------------------
  function setUpCounter(area) {
    const box = document.getElementById(area.dataset.count);
    if (!box || area.dataset.counting) return;
    area.dataset.counting = "1";
    const text = box.querySelector("[data-count-text]") || box;
    const limit = Number(area.dataset.limit);
    // Screen readers hear the count once typing pauses, not on every key.
    const spoken = document.createElement("span");
    spoken.className = "visually-hidden";
    spoken.setAttribute("aria-live", "polite");
    box.after(spoken);
    let timer;
    const update = function () {
      // Count code points as the server does (length counts UTF-16 units: an emoji is two).
      let used = 0;
      for (const _ of area.value) used += 1;
      const over = used - limit;
      text.textContent = over > 0
        ? fmt.format(over) + (over === 1 ? " character" : " characters") + " too many (the limit is " + fmt.format(limit) + ")"
        : fmt.format(used) + " of " + fmt.format(limit) + (limit === 1 ? " character" : " characters");
      box.classList.toggle("over", over > 0);
      clearTimeout(timer);
      timer = setTimeout(function () { spoken.textContent = text.textContent; }, 1200);
    };
    area.addEventListener("input", update);
    update();
    spoken.textContent = "";
  }

  // -- the model's hints follow the selected model ----------------------------------------
  function setUpModelHints(select) {
    if (select.dataset.hinting) return;
    select.dataset.hinting = "1";
    const update = function () {
      const option = select.selectedOptions[0];
      if (!option) return;
      const hint = document.querySelector("[data-model-hint]");
      if (hint) hint.textContent = option.dataset.description || "";
      const max = document.getElementById("max_tokens");
      const maxHint = document.querySelector("[data-max-tokens-hint]");
      if (max && option.dataset.defaultMaxTokens) max.placeholder = option.dataset.defaultMaxTokens;
      if (maxHint && option.dataset.maxTokens) {
        maxHint.textContent = "Empty means " + option.dataset.defaultMaxTokens + "; at most " +
          option.dataset.maxTokens + " for this model.";
      }
    };
    select.addEventListener("change", update);
  }

  // -- times in the reader's own time zone ---------------------------------------------------
  const timeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  function localTime(el) {
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when)) return;
    if (!el.title) el.title = el.textContent;
    el.textContent = timeFormat.format(when);
  }

  function enhance(root) {
    root.querySelectorAll("textarea[data-limit]").forEach(setUpCounter);
    root.querySelectorAll("select#model[name=model] option[data-max-tokens]").forEach(function (opt) {
      setUpModelHints(opt.parentElement);
    });
    root.querySelectorAll("time[datetime]").forEach(localTime);
    root.querySelectorAll("button[data-copy][hidden]").forEach(function (b) { b.hidden = false; });
  }

  // -- copy buttons ------------------------------------------------------------------------
  async function copy(button) {
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const label = button.dataset.label || button.textContent;
    button.dataset.label = label;
    try {
      await navigator.clipboard.writeText(source.value);
    } catch (e) {
      // No clipboard permission (or an old browser): select the text for Ctrl+C instead.
      source.hidden = false;
      source.select();
      const ok = document.execCommand && document.execCommand("copy");
      if (source.tagName === "TEXTAREA") source.hidden = true;
      if (!ok) { button.textContent = "Press Ctrl+C to copy"; return; }
    }
    button.textContent = "Copied";
    button.setAttribute("aria-live", "polite");
    setTimeout(function () { button.textContent = label; }, 2000);
  }

  document.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-copy]");
    if (button) copy(button);
  });

  // -- confirmations, double submits and Ctrl+Enter ----------------------------------------
  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
      return;
    }
    const busy = form.querySelector("button[data-busy-label]");
    if (busy && !form.hasAttribute("hx-post")) {
      // After this event, so the browser still submits the form.
      setTimeout(function () { busy.disabled = true; busy.textContent = busy.dataset.busyLabel; }, 0);
    }
  });

  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && event.target.matches("textarea[data-limit]")) {
      event.preventDefault();
      event.target.form.requestSubmit();
    }
  });

  // -- live parts that lose the server ------------------------------------------------------
  // A poll that fails (server restarting, network gone) is retried with a growing pause, and
  // the reader is told; a 404 means the task is gone, so polling stops.
  function pollNote(elt, text) {
    if (elt.tagName === "TR") return; // a History row retries quietly
    let note = elt.previousElementSibling;
    if (!note || !note.matches("[data-poll-note]")) {
      note = document.createElement("p");
      note.className = "flash flash-error";
      note.setAttribute("role", "alert");
      note.dataset.pollNote = "1";
      elt.before(note);
    }
    note.textContent = text;
  }

  function pollFailed(event) {
    const elt = event.detail.elt;
    if (!elt || !elt.hasAttribute("data-poll") || !window.htmx) return;
    const status = event.detail.xhr ? event.detail.xhr.status : 0;
    if (status === 404) {
      pollNote(elt, "This task no longer exists.");
      return;
    }
    const tries = Number(elt.dataset.tries || 0) + 1;
    const wait = Math.min(30, 2 ** tries);
    pollNote(elt, "Live updates paused (" + (status ? "the server answered " + status : "no connection") +
      "); trying again in " + wait + " s.");
    setTimeout(function () {
      if (!document.body.contains(elt)) return;
      elt.dataset.tries = String(tries);
      window.htmx.ajax("GET", elt.getAttribute("hx-get"), { source: elt, target: elt, swap: "outerHTML" });
    }, wait * 1000);
  }
  document.addEventListener("htmx:responseError", pollFailed);
  document.addEventListener("htmx:sendError", pollFailed);
  document.addEventListener("htmx:afterSwap", function (event) {
    const note = event.detail.elt && document.querySelector("[data-poll-note]");
    if (note && event.detail.xhr && event.detail.xhr.status < 400) note.remove();
  });

  document.addEventListener("htmx:load", function (event) { enhance(event.detail.elt); });
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { enhance(document); });
  } else {
    enhance(document);
  }
})();
