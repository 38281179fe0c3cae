// Switchgear console: the page's only script (served from /static, so the CSP can forbid
// inline script). Two behaviours, both on server-rendered, server-escaped HTML fragments:
//   data-sse="/url"   an EventSource; each "fragment" event replaces the element's content
//   data-poll="/url"  fetched every data-interval ms (default 1000) while the page is open
"use strict";

function live(element) {
  const source = new EventSource(element.dataset.sse);
  source.addEventListener("fragment", (event) => {
    element.innerHTML = event.data;
    element.dataset.updated = String(Date.now());
  });
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
