"""The report as one self-contained web page: every rank a cell of a grid drawn on a canvas,
coloured by group, the suspects in red; hover or click a cell for its group, hosts and stack;
the groups' stacks side by side below.

The page loads nothing (a Content-Security-Policy of ``default-src 'none'`` says so, and
admits only its own script, by hash). The report is embedded once, as JSON, and the script
draws from it: 16,384 ranks are one array of small numbers, not 16,384 elements. Everything
from the report reaches the page as text (``textContent``), never as markup, and the JSON is
escaped so that no ``</script>`` or ``<!--`` in a stack can end its block.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from typing import Any

from .model import ReportView, ranges_at_most
from .source import LoggedReport
from .terminal import header, summary

__all__ = ["render"]

# Hosts of a group the page lists; the rest are counted.
SHOWN_HOSTS = 16
# A cell of a rank not in a listed group: NO_STACKS, it gave no stacks; NOT_REPORTED, its
# host did not answer (or it is past the ranks the report knows).
NO_STACKS = -1
NOT_REPORTED = -2
# A cell of a rank in one of the groups a bounded report counts instead of listing.
SUMMARISED = -3


def render(logged: LoggedReport, view: ReportView, index: int, count: int) -> str:
    data = _data(logged, view, index, count)
    payload = (
        json.dumps(data, separators=(",", ":"))  # ensure_ascii: no U+2028 or U+2029 either
        .replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
    )
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    parts = {
        "csp": f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'",
        "title": html.escape(data["header"]),
        "style": _STYLE,
        "script": _SCRIPT,
        "data": payload,
    }
    # One pass: no text put in is searched for placeholders again.
    return re.sub(r"\{(\w+)\}", lambda match: parts[match[1]], _TEMPLATE)


def _data(logged: LoggedReport, view: ReportView, index: int, count: int) -> dict[str, Any]:
    report = view.report
    groups = view.groups
    summarised = view.summarised.ranks if view.summarised else []
    last = max(
        [*report["unanswered"], *report["suspects"], *summarised, *(max(g.ranks) for g in groups)],
        default=-1,
    )
    cells = [NOT_REPORTED] * (last + 1)
    for rank in report["unanswered"]:
        cells[rank] = NO_STACKS
    for rank in summarised:
        cells[rank] = SUMMARISED
    for position, group in enumerate(groups):
        for rank in group.ranks:
            cells[rank] = position
    # Each rank's host (an index into host_names, -1: not known) and pid (0: not known).
    host_names: dict[str, int] = {}
    cell_hosts, cell_pids = [-1] * len(cells), [0] * len(cells)
    for group in groups:
        for rank, pid, host in zip(group.ranks, group.pids, group.rank_hosts):
            cell_hosts[rank] = host_names.setdefault(host, len(host_names))
            cell_pids[rank] = pid
    return {
        "header": header(logged, view, index, count),
        "summary": summary(view),
        "suspects": view.suspects,
        "suspectsText": view.suspects_text(),
        "suspectsHow": view.suspects_how,
        "notes": view.notes(),
        "groups": [
            {
                "number": g.number,
                "suspect": g.suspect,
                "count": len(g.ranks),
                "ranges": g.rank_ranges,
                "where": g.where,
                "hosts": g.hosts[:SHOWN_HOSTS],
                "hostCount": len(g.hosts),
                "scopes": g.scopes,
                "collectives": g.collectives,
                "stack": [[line.text, int(line.parting)] for line in g.stack],
            }
            for g in groups
        ],
        "summarised": view.summarised
        and {
            "groups": view.summarised.groups,
            "ranks": len(view.summarised.ranks),
            "ranges": ranges_at_most(view.summarised.ranks),
            "suspects": view.summarised.suspects,
            "places": view.summarised.places,
        },
        "cells": cells,
        "hostNames": list(host_names),
        "cellHosts": cell_hosts,
        "cellPids": cell_pids,
    }


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header id="top"></header>
<section>
<h2>Ranks</h2>
<div id="legend"></div>
<div id="grid-wrap"><canvas id="grid"></canvas></div>
<div id="tip" hidden></div>
<div id="detail" hidden></div>
</section>
<section>
<h2>Groups
<span class="hint">suspects first; highlighted: the frames where the groups part</span></h2>
<div id="groups"></div>
</section>
<footer id="foot"></footer>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

_STYLE = """
:root { --suspect: #e5484d; --ink: #1c2024; --muted: #60646c; --line: #e0e3e8; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px 32px; background: #f6f7f9; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 22px 0 8px; }
.hint { font-weight: normal; color: var(--muted); font-size: 12px; margin-left: 8px; }
.summary { color: var(--muted); }
.suspects { margin-top: 8px; font-size: 16px; font-weight: 600; color: var(--suspect); }
.suspects .how { font-weight: normal; color: var(--muted); font-size: 13px; }
.note { color: #8a5a00; font-size: 13px; }
#legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin-bottom: 10px; font-size: 12px; }
.key { display: inline-flex; align-items: center; gap: 6px; cursor: pointer; }
.swatch { width: 12px; height: 12px; border-radius: 2px; display: inline-block; flex: none; }
#grid-wrap { position: relative; background: #fff; border: 1px solid var(--line);
  border-radius: 8px; padding: 12px; overflow-x: auto; }
#grid { display: block; cursor: crosshair; }
#tip { position: fixed; pointer-events: none; background: #1c2024; color: #fff;
  border-radius: 6px; padding: 6px 9px; font-size: 12px; max-width: 420px; z-index: 2;
  white-space: pre-wrap; box-shadow: 0 4px 14px rgba(0,0,0,.25); }
#detail { margin-top: 10px; }
#groups { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.card { flex: 0 0 auto; width: clamp(380px, calc(50% - 6px), 600px); background: #fff;
  border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
.card.suspect { border-color: var(--suspect); box-shadow: 0 0 0 1px var(--suspect) inset; }
.card.selected { outline: 3px solid #3e63dd; outline-offset: -3px; }
.card h3 { margin: 0; font-size: 14px; display: flex; align-items: center; gap: 8px; }
.badge { background: var(--suspect); color: #fff; font-size: 11px; border-radius: 4px;
  padding: 1px 6px; letter-spacing: .04em; }
.where { font-weight: 600; margin: 4px 0 2px; }
.meta { color: var(--muted); font-size: 12px; overflow-wrap: break-word; }
.host { white-space: nowrap; }
.fr { font-size: 12px; color: #2b4a8b; overflow-wrap: break-word; }
pre { margin: 8px 0 0; padding: 8px; background: #f6f7f9; border-radius: 6px;
  font: 11.5px/1.5 ui-monospace, "DejaVu Sans Mono", monospace; overflow-x: auto;
  color: #6b7079; }
pre .parting { color: #1c2024; background: #ffe7a3; font-weight: 600; }
button { font: inherit; padding: 6px 12px; border-radius: 6px; border: 1px solid var(--line);
  background: #fff; cursor: pointer; }
footer { margin-top: 18px; color: var(--muted); font-size: 12px; }
"""

_SCRIPT = r"""
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const SUSPECT = "#e5484d", NO_STACKS = "#b9bdc6", NOT_REPORTED = "#e9ebef",
    SUMMARISED = "#7e8794";
  // Never red: red is the suspects'.
  const PALETTE = ["#4e79a7", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
    "#86bcb6", "#8cd17d", "#499894", "#d4a6c8", "#a0cbe8", "#f1ce63", "#79706e", "#bab0ac"];
  const GROUP_CARDS = 30, LEGEND_GROUPS = 12, GUTTER = 56;
  const groups = data.groups, cells = data.cells, suspects = new Set(data.suspects);
  const colour = (group) => group.number <= PALETTE.length ? PALETTE[group.number - 1]
    : `hsl(${40 + (group.number * 47) % 280}, 42%, 58%)`;
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const swatch = (fill) => { const s = el("span", "swatch"); s.style.background = fill; return s; };
  const hostsText = (g) => g.hostCount === 1 ? `host ${g.hosts[0]}`
    : `${g.hostCount} hosts: ${g.hosts.join(", ")}` +
      (g.hostCount > g.hosts.length ? `, and ${g.hostCount - g.hosts.length} more` : "");
  // Where a rank runs: its host and pid, when the report has them (else its group's hosts).
  const placeOf = (rank, g) => data.cellHosts[rank] >= 0
    ? `host ${data.hostNames[data.cellHosts[rank]]}, pid ${data.cellPids[rank]}` : hostsText(g);
  let selected = -1, pinned = -1;

  // -- the header
  const top = document.getElementById("top");
  top.append(el("h1", "", data.header), el("div", "summary", data.summary));
  const line = el("div", "suspects");
  if (data.suspects.length) {
    line.textContent = `Suspects: ${data.suspectsText} `;
    line.append(el("span", "how", "(" + data.suspectsHow + ")"));
  } else {
    line.textContent = `Suspects: ${data.suspectsText}`;
    line.style.color = "inherit";
  }
  top.append(line);
  for (const note of data.notes) top.append(el("div", "note", note));

  // -- the legend
  const legend = document.getElementById("legend");
  // The largest groups (the report's order), whose colours fill the grid.
  const byNumber = groups.map((g, i) => [g, i]).sort((a, b) => a[0].number - b[0].number);
  byNumber.slice(0, LEGEND_GROUPS).forEach(([g, i]) => {
    const key = el("span", "key");
    const count = g.count.toLocaleString("en-US");
    key.append(swatch(colour(g)), `group ${g.number} · ${count} · ${g.where}`);
    key.addEventListener("click", () => select(selected === i ? -1 : i));
    legend.append(key);
  });
  if (groups.length > LEGEND_GROUPS) {
    legend.append(el("span", "key", `and ${groups.length - LEGEND_GROUPS} more groups`));
  }
  const kinds = [[SUSPECT, "suspect"], [NO_STACKS, "gave no stacks"],
    [NOT_REPORTED, "not in the report"]];
  if (data.summarised) kinds.splice(1, 0, [SUMMARISED, "in a summarised group"]);
  for (const [fill, text] of kinds) {
    const key = el("span", "key");
    key.append(swatch(fill), text);
    legend.append(key);
  }

  // -- the grid: one cell per rank, row after row
  const canvas = document.getElementById("grid"), wrap = document.getElementById("grid-wrap");
  const tip = document.getElementById("tip");
  const n = cells.length;
  let cols = 8;
  while (cols < 128 && cols * cols < n * 2) cols *= 2;
  cols = Math.max(1, Math.min(cols, n));
  const rows = Math.ceil(n / cols);
  let pitch = 0, size = 0;

  function fill(rank) {
    if (suspects.has(rank)) return SUSPECT;
    const c = cells[rank];
    return c >= 0 ? colour(groups[c]) : c === -1 ? NO_STACKS : c === -3 ? SUMMARISED
      : NOT_REPORTED;
  }

  function draw() {
    const width = wrap.clientWidth - 24 - GUTTER;
    pitch = Math.max(4, Math.min(30, Math.floor(width / cols)));
    size = pitch >= 6 ? pitch - 1 : pitch;
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = GUTTER + cols * pitch, cssHeight = rows * pitch;
    canvas.style.width = cssWidth + "px";
    canvas.style.height = cssHeight + "px";
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    ctx.fillStyle = "#60646c";
    ctx.font = "10px ui-monospace, monospace";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const every = Math.ceil(14 / pitch);
    for (let row = 0; row < rows; row += every) {
      ctx.fillText(String(row * cols), GUTTER - 8, row * pitch + size / 2);
    }
    for (let rank = 0; rank < n; rank++) {
      const c = cells[rank];
      ctx.globalAlpha = selected < 0 || c === selected ? 1 : 0.22;
      ctx.fillStyle = fill(rank);
      ctx.fillRect(GUTTER + (rank % cols) * pitch, Math.floor(rank / cols) * pitch, size, size);
    }
    ctx.globalAlpha = 1;
    if (pitch < 16 && suspects.size <= 64) {
      // A ring around each suspect: one cell in 16,384 is easy to miss.
      ctx.strokeStyle = SUSPECT;
      ctx.lineWidth = 2;
      for (const rank of suspects) {
        if (rank >= n) continue;
        ctx.beginPath();
        ctx.arc(GUTTER + (rank % cols) * pitch + size / 2, Math.floor(rank / cols) * pitch +
          size / 2, Math.max(10, 2.5 * pitch), 0, 2 * Math.PI);
        ctx.stroke();
      }
    }
    if (pinned >= 0) {
      ctx.strokeStyle = "#1c2024";
      ctx.lineWidth = 2;
      ctx.strokeRect(GUTTER + (pinned % cols) * pitch - 1, Math.floor(pinned / cols) * pitch - 1,
        size + 2, size + 2);
    }
    // Where the cells are, for whoever checks the drawing (the tests read pixels there).
    const box = canvas.getBoundingClientRect();
    document.body.dataset.grid = JSON.stringify({
      left: box.left + window.scrollX + GUTTER, top: box.top + window.scrollY,
      pitch, size, cols,
    });
  }

  function rankAt(event) {
    const box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left - GUTTER, y = event.clientY - box.top;
    if (x < 0 || y < 0) return -1;
    const col = Math.floor(x / pitch), row = Math.floor(y / pitch);
    const rank = row * cols + col;
    return col < cols && rank < n ? rank : -1;
  }

  function describe(rank) {
    const c = cells[rank];
    const lines = [`rank ${rank}` + (suspects.has(rank) ? "  (suspect)" : "")];
    if (c >= 0) {
      const g = groups[c];
      lines.push(`group ${g.number}, ${g.where}`, placeOf(rank, g));
    } else {
      lines.push(c === -1 ? "it gave no stacks" : c === -3
        ? `in one of the ${data.summarised.groups} groups the report counts, not lists`
        : "not in the report (its host did not answer)");
    }
    return lines;
  }

  canvas.addEventListener("mousemove", (event) => {
    const rank = rankAt(event);
    if (rank < 0) { tip.hidden = true; return; }
    const lines = describe(rank), c = cells[rank];
    if (c >= 0) {
      const frames = groups[c].stack.filter((s) => s[1]).slice(0, 4).map((s) => s[0].trim());
      if (frames.length) lines.push("", ...frames);
    }
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const below = event.clientY + 14 + tip.offsetHeight < window.innerHeight;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = (below ? event.clientY + 14 : event.clientY - 10 - tip.offsetHeight) + "px";
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
  canvas.addEventListener("click", (event) => {
    const rank = rankAt(event);
    pinned = rank === pinned ? -1 : rank;
    showDetail();
    select(pinned >= 0 && cells[pinned] >= 0 ? cells[pinned] : -1);
  });

  function showDetail() {
    const detail = document.getElementById("detail");
    detail.replaceChildren();
    detail.hidden = pinned < 0;
    if (pinned < 0) return;
    const c = cells[pinned];
    if (c >= 0) {
      const g = groups[c];
      detail.append(card(g, c, `rank ${pinned} (${placeOf(pinned, g)}) · group ${g.number}`));
    } else {
      detail.append(el("div", "note", describe(pinned).join(": ")));
    }
  }

  // -- the groups, side by side
  function card(g, index, title) {
    const node = el("div", "card" + (g.suspect ? " suspect" : ""));
    const h = el("h3");
    h.append(swatch(colour(g)), title || `group ${g.number}`);
    if (g.suspect) h.append(el("span", "badge", "SUSPECT"));
    node.append(h, el("div", "where", g.where));
    node.append(el("div", "meta", `${g.count.toLocaleString("en-US")} rank(s): ${g.ranges}`));
    const hosts = el("div", "meta", g.hostCount === 1 ? "host " : `${g.hostCount} hosts: `);
    g.hosts.forEach((host, i) => hosts.append(i ? ", " : "", el("span", "host", host)));
    if (g.hostCount > g.hosts.length) hosts.append(`, and ${g.hostCount - g.hosts.length} more`);
    node.append(hosts);
    if (g.scopes.length) node.append(el("div", "meta", "scopes: " + g.scopes.join(", ")));
    for (const text of g.collectives) node.append(el("div", "fr", "Flight Recorder, " + text));
    const pre = el("pre");
    for (const [text, parting] of g.stack) {
      pre.append(parting ? el("span", "parting", text) : text, "\n");
    }
    node.append(pre);
    node.addEventListener("click", () => select(selected === index ? -1 : index));
    return node;
  }

  const container = document.getElementById("groups");
  const cards = [];
  function addCards(from, to, put) {
    for (let i = from; i < to; i++) {
      cards[i] = card(groups[i], i);
      put(cards[i]);
    }
  }
  addCards(0, Math.min(GROUP_CARDS, groups.length), (node) => container.append(node));
  if (groups.length > GROUP_CARDS) {
    const more = el("button", "", `show the other ${groups.length - GROUP_CARDS} groups`);
    more.addEventListener("click", () => {
      addCards(GROUP_CARDS, groups.length, (node) => more.before(node));
      more.remove();
    });
    container.append(more);
  }
  if (data.summarised) {
    const s = data.summarised, node = el("div", "card");
    const h = el("h3");
    h.append(swatch(SUMMARISED), `and ${s.groups} more groups, summarised`);
    node.append(h, el("div", "meta", `${s.ranks} rank(s), ${s.suspects} suspect(s): ${s.ranges}`));
    for (const place of s.places) node.append(el("div", "meta", place));
    container.append(node);
  }

  function select(index) {
    selected = index;
    cards.forEach((node, i) => node.classList.toggle("selected", i === index));
    draw();
  }

  draw();
  let resizing = 0;
  window.addEventListener("resize", () => {
    cancelAnimationFrame(resizing);
    resizing = requestAnimationFrame(draw);
  });
  const ms = performance.now();
  document.body.dataset.renderMs = ms.toFixed(0);
  document.getElementById("foot").textContent =
    `${n.toLocaleString("en-US")} ranks drawn ${ms.toFixed(0)} ms after the page started loading.`;
})();
"""
