// wgjit web page: the little script it has. Everything works without it except the live view's
// refresh and the confirmation before a revoke. No framework, no build step.
"use strict";

// Revoking is for good: ask first (forms carry data-confirm).
document.addEventListener("submit", (ev) => {
  const form = ev.target;
  const question = form instanceof HTMLFormElement ? form.dataset.confirm : undefined;
  if (question && !window.confirm(question)) {
    ev.preventDefault();
  }
});

// The live gateway view: fetch the server-rendered (escaped) fragment again every few seconds.
// The session cookie goes along by itself (same origin); the fragment is HTML that the server
// escaped, the same template as the first render.
function startLive() {
  const box = document.getElementById("live");
  if (!box || !box.dataset.src) {
    return;
  }
  const every = Number(box.dataset.interval || "2") * 1000;
  let busy = false;
  async function refresh() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    try {
      const r = await fetch(box.dataset.src, {
        credentials: "same-origin",
        headers: { "X-Requested-With": "wgjit-web" },
        cache: "no-store",
      });
      if (r.status === 401) {
        window.location.reload(); // the session ended: back to sign in
        return;
      }
      if (r.ok) {
        box.innerHTML = await r.text();
        box.dataset.updated = String(Date.now());
      }
    } catch (e) {
      // the server is restarting or gone: keep the last view, try again later
    } finally {
      busy = false;
    }
  }
  window.setInterval(refresh, every);
}

document.addEventListener("DOMContentLoaded", startLive);
