// Switchgear console: the page's only script (served from /static, so the CSP can forbid
// inline script). Two behaviours, both on server-rendered, server-escaped HTML fragments:
//   data-sse="/url"   an EventSource; each "fragment" event replaces the element's content
//   data-poll="/url"  fetched every data-interval ms (default 1000) while the page is open
"use strict";

function say(text) {
  const status = document.getElementById("live-status");
  if (status) status.textContent = text;
}

// Back to the login page once the session is gone (e.g. the control plane restarted: sessions
// live in its memory); otherwise try again shortly.
function recheck(retry) {
  fetch("/api/fleet", { credentials: "same-origin" })
    .then((response) => (response.status === 401 ? window.location.assign("/login") : setTimeout(retry, 1000)))
    .catch(() => setTimeout(retry, 1000));
}

function live(element) {
  const source = new EventSource(element.dataset.sse);
  source.addEventListener("fragment", (event) => {
    element.innerHTML = event.data;
    element.dataset.updated = String(Date.now());
    element.classList.remove("stale");
    say("live");
  });
  source.onerror = () => {
    element.classList.add("stale");
    say("connection to the control plane lost; retrying…");
    if (source.readyState === EventSource.CLOSED) recheck(() => live(element));
  };
  window.addEventListener("pagehide", () => source.close());
}

function poll(element) {
  const interval = Number(element.dataset.interval || 1000);
  let busy = false;
  setInterval(async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(element.dataset.poll, { credentials: "same-origin" });
      if (response.ok) {
        element.innerHTML = await response.text();
        element.dataset.updated = String(Date.now());
      } else if (response.status === 401) {
        window.location.assign("/login");
      }
    } catch (error) {
      // a restarting control plane: keep the last view and try again next tick
    } finally {
      busy = false;
    }
  }, interval);
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-sse]").forEach(live);
  document.querySelectorAll("[data-poll]").forEach(poll);
});
