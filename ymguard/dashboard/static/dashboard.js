// ymguard dashboard: polls api/snapshot, keeps 15 minutes of per-second figures, draws them.
// No dependencies and no network access beyond this mount. Every value from the server is
// put in the page with textContent, never as HTML.
"use strict";

(() => {
  const HISTORY = 900;        // seconds kept and charted
  const POLL_MS = 2000;       // how often the snapshot is fetched
  const OVERLAP = 30;         // seconds asked for again: other processes' late reports land
  const FIELDS = ["passed", "blocked", "success", "errors", "rt_ms"];
  const COLORS = { passed: "#1f9d55", blocked: "#d64545", errors: "#e08a00", rt: "#3566d6" };

  // resource -> field -> Map(second -> value)
  const history = new Map();
  let last = null;            // the newest second received
  let failures = 0;
  let shownNames = [];        // the resources on the page, in order

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(tableId, rows, columns, emptyText) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...(rows.length ? rows : [
      el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, emptyText)),
    ]));
  }

  const fmtRate = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));
  const fmtMs = (v) => (v === null || v === undefined ? "–" : v >= 100 ? `${v.toFixed(0)} ms` : `${v.toFixed(1)} ms`);

  function ago(seconds) {
    if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
    return `${Math.floor(seconds / 86400)} d`;
  }

  function clock(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  // -- history ---------------------------------------------------------------------------

  function merge(series) {
    for (const [name, columns] of Object.entries(series.resources)) {
      let kept = history.get(name);
      if (!kept) {
        kept = Object.fromEntries(FIELDS.map((f) => [f, new Map()]));
        history.set(name, kept);
      }
      for (const f of FIELDS) {
        const values = columns[f] || [];
        for (let i = 0; i < values.length; i++) {
          const second = series.first + i;
          if (values[i]) kept[f].set(second, values[i]);
          else kept[f].delete(second);
        }
      }
    }
    last = series.last;
    const oldest = last - HISTORY + 1;
    for (const kept of history.values()) {
      for (const f of FIELDS) {
        for (const second of kept[f].keys()) if (second < oldest) kept[f].delete(second);
      }
    }
  }

  function totals(name) {
    const kept = history.get(name);
    const out = { passed: 0, blocked: 0, success: 0, errors: 0, rt_ms: 0 };
    if (!kept) return out;
    for (const f of FIELDS) for (const v of kept[f].values()) out[f] += v;
    return out;
  }

  function column(name, field) {
    const values = new Float64Array(HISTORY);
    const kept = history.get(name);
    if (!kept || last === null) return values;
    const first = last - HISTORY + 1;
    for (const [second, v] of kept[field]) {
      const i = second - first;
      if (i >= 0 && i < HISTORY) values[i] = v;
    }
    return values;
  }

  // -- charts ----------------------------------------------------------------------------

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function draw(canvas, lines, unit) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (!width || !height) return;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const left = 44, right = 8, top = 6, bottom = 16;
    const w = width - left - right, h = height - top - bottom;
    let max = 0;
    for (const line of lines) for (const v of line.values) if (v > max) max = v;
    max = niceMax(max);
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    ctx.strokeStyle = "#e3e8ef";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const frac of [0, 0.5, 1]) {
      const y = Math.round(top + h - frac * h) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
      const label = max * frac;
      ctx.fillText(`${label >= 10 || label === 0 ? label.toFixed(0) : label.toFixed(1)}${unit}`, left - 6, y);
    }
    if (last !== null) {
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      const first = last - HISTORY + 1;
      for (let s = Math.ceil(first / 300) * 300; s <= last; s += 300) {
        const x = Math.round(left + ((s - first) / (HISTORY - 1)) * w) + 0.5;
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
        ctx.fillText(clock(s).slice(0, 5), x, top + h + 3);
      }
    }
    for (const line of lines) {
      ctx.strokeStyle = line.color;
      ctx.lineWidth = 1.5;
      ctx.lineJoin = "round";
      ctx.beginPath();
      const v = line.values;
      let drawn = false;  // whether the previous point is on the path
      for (let i = 0; i < v.length; i++) {
        // A sparse line (blocked, errors) leaves out its stretches of zeros, so that it
        // never hides the line below it on the baseline.
        if (line.sparse && !v[i] && !(i > 0 && v[i - 1]) && !(i + 1 < v.length && v[i + 1])) {
          drawn = false;
          continue;
        }
        const x = left + (i / (HISTORY - 1)) * w;
        const y = top + h - (v[i] / max) * h;
        if (drawn) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        drawn = true;
      }
      ctx.stroke();
    }
  }

  function renderCharts(names) {
    const box = $("charts");
    const existing = new Map([...box.children].map((c) => [c.dataset.resource, c]));
    const wanted = [];
    for (const name of names) {
      let card = existing.get(name);
      if (!card) {
        card = el("div", { class: "chart", "data-resource": name },
          el("h3", { title: name }, name),
          el("canvas", { class: "calls", "aria-label": `calls per second of ${name}` }),
          el("canvas", { class: "rt", "aria-label": `average response time of ${name}` }));
      }
      wanted.push(card);
    }
    box.replaceChildren(...wanted);
    if (!names.length) box.append(el("p", { class: "hint" }, "No resources yet."));
    for (const card of wanted) {
      const name = card.dataset.resource;
      const passed = column(name, "passed");
      const blocked = column(name, "blocked");
      const errors = column(name, "errors");
      const success = column(name, "success");
      const rtTotal = column(name, "rt_ms");
      const rt = new Float64Array(HISTORY);
      for (let i = 0; i < HISTORY; i++) {
        const n = success[i] + errors[i];
        rt[i] = n ? rtTotal[i] / n : 0;
      }
      draw(card.querySelector("canvas.calls"), [
        { values: passed, color: COLORS.passed },
        { values: blocked, color: COLORS.blocked, sparse: true },
        { values: errors, color: COLORS.errors, sparse: true },
      ], "/s");
      draw(card.querySelector("canvas.rt"), [{ values: rt, color: COLORS.rt }], " ms");
    }
  }

  // -- tables ----------------------------------------------------------------------------

  function num(field, value, text) {
    const cls = ["num", field.replace(/_.*/, "")];
    if (value) cls.push("nonzero");
    return el("td", { class: cls.join(" "), "data-field": field }, text === undefined ? value : text);
  }

  function renderResources(resources) {
    const rows = resources.map((r) => {
      const t = totals(r.name);
      const done = t.success + t.errors;
      return el("tr", { "data-resource": r.name },
        el("td", { class: "name" }, r.name),
        num("passed_per_second", r.per_second.passed, fmtRate(r.per_second.passed)),
        num("blocked_per_second", r.per_second.blocked, fmtRate(r.per_second.blocked)),
        num("errors_per_second", r.per_second.errors, fmtRate(r.per_second.errors)),
        el("td", { class: "num", "data-field": "avg_rt_ms", title: done ? `15 min: ${fmtMs(t.rt_ms / done)}` : null }, fmtMs(r.avg_rt_ms)),
        num("passed_total", t.passed),
        num("blocked_total", t.blocked),
        num("errors_total", t.errors));
    });
    fill("resources", rows, 8, "No resources yet.");
  }

  function renderBreakers(breakers) {
    const rows = breakers.map((b) => {
      const spread = Object.keys(b.states || {}).length > 1
        ? ` (${Object.entries(b.states).map(([s, n]) => `${n} ${s}`).join(", ")})` : "";
      return el("tr", { "data-breaker": b.name },
        el("td", { class: "name", title: b.resource }, b.name),
        el("td", { "data-field": "state" }, el("span", { class: `badge ${b.state}` }, b.state), spread),
        el("td", {}, b.strategy),
        el("td", { class: "num" }, b.threshold),
        num("passed", b.passed), num("blocked", b.blocked), num("errors", b.errors));
    });
    fill("breakers", rows, 7, "No breakers in the rules.");
  }

  function renderSemaphores(semaphores) {
    const show = (v) => (v === null || v === undefined ? "?" : v);
    const rows = semaphores.map((s) => el("tr", { "data-semaphore": s.name },
      el("td", { class: "name" }, s.name),
      el("td", { class: "num", "data-field": "held" }, show(s.held)),
      el("td", { class: "num", "data-field": "available" }, show(s.available)),
      el("td", { class: "num", "data-field": "waiting" }, show(s.waiting)),
      el("td", { class: "num", "data-field": "permits" }, s.permits),
      el("td", { class: "name wrap" }, s.resources.join(", "))));
    fill("semaphores", rows, 6, "No semaphores in the rules.");
  }

  function renderRules(rules) {
    $("rules-version").textContent = rules.version;
    // A version that is the digest's beginning (sha256:...) says it already.
    $("rules-digest").textContent = rules.digest.startsWith(rules.version) ? "" : `digest ${rules.digest}`;
    const rows = Object.entries(rules.resources).sort(([a], [b]) => (a < b ? -1 : 1)).map(([name, list]) =>
      el("tr", { "data-rules": name },
        el("td", { class: "name" }, name),
        el("td", { class: "wrap" }, ...list.map((r) => el("span", { class: "rule", title: r.kind }, r.rule)))));
    fill("rules", rows, 2, "No rules.");
  }

  function renderProcesses(processes, now) {
    const rows = processes.map((p) => el("tr", { "data-process": p.id },
      el("td", {}, p.host, p.this ? el("span", { class: "badge this" }, "this") : null),
      el("td", { class: "num" }, p.pid),
      el("td", {}, ago(now - p.started_at)),
      el("td", { class: "name" }, p.rules_version),
      el("td", { class: "num" }, p.inflight),
      el("td", {}, p.reported_at ? `${ago(now - p.reported_at)} ago` : "live")));
    fill("processes", rows, 6, "No process has reported yet.");
    $("process-count").textContent = String(processes.length);
  }

  function render(data) {
    merge(data.series);
    $("store").textContent = data.cluster ? `${data.store} (cluster)` : data.store;
    $("scope-note").textContent = data.cluster ? ", summed over every process" : "";
    renderResources(data.resources);
    shownNames = data.resources.map((r) => r.name);
    renderCharts(shownNames);
    renderBreakers(data.breakers);
    renderSemaphores(data.semaphores);
    renderRules(data.rules);
    renderProcesses(data.processes, data.generated_at);
    $("updated-at").textContent = clock(data.generated_at);
    const alert = $("alert");
    alert.hidden = !data.cluster_error;
    alert.textContent = data.cluster_error || "";
  }

  async function poll() {
    const since = last === null ? "" : `?since=${last - OVERLAP}`;
    try {
      const response = await fetch(`api/snapshot${since}`, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401 || response.status === 403) {
        const problem = await response.json().catch(() => ({}));
        throw new Error(`Not allowed: ${problem.detail || response.statusText}`);
      }
      if (!response.ok) throw new Error(`The dashboard answered ${response.status}`);
      render(await response.json());
      failures = 0;
      $("live").className = "dot ok";
    } catch (err) {
      failures += 1;
      $("live").className = "dot stale";
      const alert = $("alert");
      alert.hidden = false;
      alert.textContent = `${err.message || err} (retrying)`;
    } finally {
      setTimeout(poll, failures ? Math.min(POLL_MS * 2 ** failures, 30000) : POLL_MS);
    }
  }

  let resized = null;
  window.addEventListener("resize", () => {
    clearTimeout(resized);
    resized = setTimeout(() => renderCharts(shownNames), 150);
  });
  poll();
})();
