"""The dashboard's stylesheet and script, served from its own origin (no CDN, no inline script).

The script polls ``/api/state`` every ``data-poll-ms`` with the revision it
shows; the server answers 204 when nothing changed, else the new fragment,
which replaces the page's ``<main>``: no reload, scroll position kept.
"""

SCRIPT = """\
"use strict";
(function () {
  const main = document.getElementById("dashboard");
  const live = document.getElementById("live");
  const every = Number(main.dataset.pollMs) || 1000;
  let revision = main.dataset.revision;

  function show(text, healthy) {
    live.textContent = text;
    live.className = healthy ? "live" : "live down";
  }

  async function poll() {
    try {
      const response = await fetch(
        "/api/state?since=" + encodeURIComponent(revision),
        { credentials: "same-origin", cache: "no-store" },
      );
      if (response.status === 200) {
        const state = await response.json();
        revision = state.revision;
        main.dataset.revision = revision;
        main.innerHTML = state.html;
      }
      if (response.ok) {
        show("live", true);
      } else {
        show("error " + response.status, false);
      }
    } catch (error) {
      show("offline", false);
    }
    window.setTimeout(poll, every);
  }

  window.setTimeout(poll, every);
})();
"""

STYLESHEET = """\
:root { color-scheme: light; --ink: #1b1f24; --muted: #5b6470; --line: #d8dde3; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--ink); background: #f6f7f9; }
header { display: flex; align-items: center; gap: 1rem; padding: .6rem 1.2rem;
  background: #0f3057; color: white; }
header h1 { font-size: 1.1rem; margin: 0; }
.live { font-size: .8rem; padding: .1rem .5rem; border-radius: 1rem; background: #2ca02c; }
.live.down { background: #d62728; }
main { padding: 1rem 1.2rem; display: grid; gap: 1rem; }
section { background: white; border: 1px solid var(--line); border-radius: 6px;
  padding: .8rem 1rem; }
h2 { font-size: 1rem; margin: 0 0 .6rem; }
.folder, .note { color: var(--muted); margin: .2rem 0; }
.state { font-size: .75rem; padding: .1rem .45rem; border-radius: 1rem; margin-left: .4rem;
  background: #e8eef6; vertical-align: middle; }
.state.running { background: #fff2cc; }
.state.finished { background: #d9f2d9; }
.tiles { display: flex; flex-wrap: wrap; gap: .6rem; margin: .4rem 0 0; }
.tile { min-width: 9rem; padding: .4rem .6rem; border: 1px solid var(--line); border-radius: 4px; }
.tile dt { color: var(--muted); font-size: .75rem; }
.tile dd { margin: 0; font-size: 1.05rem; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: .8rem; }
figure { margin: 0; }
figure svg { width: 100%; height: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .25rem .6rem; border-bottom: 1px solid var(--line); }
tr.total th, tr.total td { font-weight: 600; }
.status { padding: .05rem .4rem; border-radius: 3px; font-size: .8rem; }
.status.good { background: #d9f2d9; color: #1e6b1e; }
.status.bad { background: #f8d7d7; color: #9b1c1c; }
.status.candidate { background: #fff2cc; color: #7a5b00; }
meter { width: 24rem; height: 1.2rem; }
"""
