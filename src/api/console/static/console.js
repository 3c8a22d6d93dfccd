// Reflex console: progressive enhancement only. Pages work without it; with it, times are
// shown in the viewer's zone, a running run's page updates live, and the approvals page picks
// up new requests.
"use strict";

const fmt = new Intl.DateTimeFormat("en-US", {
  year: "numeric", month: "2-digit", day: "2-digit",
  hour: "2-digit", minute: "2-digit", second: "2-digit",
  hourCycle: "h23", timeZoneName: "short",
});

// 2026-11-24 02:14:14 GMT+9: unambiguous in every locale, in the viewer's zone.
function local(d) {
  const p = Object.fromEntries(fmt.formatToParts(d).map((x) => [x.type, x.value]));
  return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second} ${p.timeZoneName}`;
}

function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const d = new Date(el.getAttribute("datetime"));
    if (!isNaN(d)) {
      el.title = el.getAttribute("datetime");
      el.textContent = local(d);
    }
  }
}

function liveRun() {
  const live = document.getElementById("live");
  if (!live || !live.dataset.events || !window.EventSource) return;
  const source = new EventSource(live.dataset.events);
  const apply = (e) => {
    const data = JSON.parse(e.data);
    // Keep what the operator is typing into a comment box.
    const typing = live.querySelector("input[type=text]:focus");
    if (typing && e.type !== "end") return;
    live.innerHTML = data.html;
    live.dataset.state = data.state;
    localTimes(live);
  };
  source.addEventListener("update", apply);
  source.addEventListener("end", (e) => { apply(e); source.close(); live.dataset.ended = "true"; });
}

function refreshPending() {
  const pending = document.getElementById("pending");
  if (!pending || !pending.dataset.refresh) return;
  const every = Number(pending.dataset.refresh) * 1000;
  setInterval(async () => {
    const busy = [...pending.querySelectorAll("input[type=text]")]
      .some((i) => i.value !== "" || i === document.activeElement);
    if (busy || document.hidden) return;
    try {
      const resp = await fetch(location.href, { credentials: "same-origin" });
      if (!resp.ok) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.getElementById("pending");
      if (fresh && fresh.innerHTML !== pending.innerHTML) {
        pending.innerHTML = fresh.innerHTML;
        localTimes(pending);
      }
    } catch (_) { /* the next tick tries again */ }
  }, every);
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  for (const el of document.querySelectorAll(".tz")) {
    el.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  }
  liveRun();
  refreshPending();
});
