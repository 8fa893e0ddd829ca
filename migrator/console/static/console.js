// migrator console: renders the view the server pushes (server-sent events) and sends the operator's actions.
// No library: text goes into the page as text (textContent), never as markup; the token stays in this page's memory
// and goes out only in the X-Migrator-Token header of an action.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let view = null;
  let offset = 0;            // the target's clock (which times the steps) minus this browser's, in ms
  let pending = null;        // the action being confirmed
  // When each step was first shown (ms since the epoch, this browser's clock), for measuring the delay from a step
  // being recorded to it being on screen (bench/console.py reads it).
  const seen = (window.migratorSeen = {});

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v; else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const fill = (node, ...children) => { node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined)); };
  const ms = (iso) => (iso ? Date.parse(iso) : NaN);
  const now = () => Date.now() + offset;

  function seconds(s) {
    if (s === null || s === undefined || isNaN(s)) return "–";
    if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
    const m = Math.floor(s / 60), h = Math.floor(m / 60);
    return h ? `${h} h ${m % 60} min` : `${m} min ${Math.round(s % 60)} s`;
  }
  function bytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (b >= 1000 && i < units.length - 1) { b /= 1000; i++; }
    return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }
  const count = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en"));

  // --- rendering ------------------------------------------------------------------------------------------------

  function render(v) {
    view = v;
    const m = v.migration || {};
    $("names").textContent = `${m.source || "?"} → ${m.target || "?"}`;
    const p = v.phase || {};
    $("phase").textContent = p.name || "?";
    $("phase").className = p.name === "held" || p.name === "frozen" ? "held" : "";
    $("since").textContent = p.since ? `since ${when(p.since)}` : "";
    fill($("next"), "Next: ", p.next || "", p.command ? [" — ", el("code", {}, p.command)] : null,
         p.button ? ` (or the “${label(p.button)}” button)` : null);
    fill($("warnings"), (v.error ? [v.error] : []).concat(v.warnings || []).map((w) => el("li", {}, w)));
    renderLag(v.lag || {});
    renderChecklist(v.checklist);
    renderAttempts(v.attempts || []);
    renderActions(v);
    renderTables(v.tables || [], v.copy || {});
    renderAudit(v.audit || []);
    tick();
  }

  function label(name) {
    const a = (view && view.actions || []).find((x) => x.name === name);
    return a ? a.label : name;
  }

  function renderLag(lag) {
    $("lag-now").textContent = lag.pending === null || lag.pending === undefined ? "–" : seconds(lag.seconds || 0);
    $("pending").textContent = count(lag.pending);
    $("log-size").textContent = bytes(lag.log_bytes);
    drawChart(lag.samples || []);
  }

  // A small SVG chart: the lag (line) and the pending events (grey, own scale) over the samples kept.
  function drawChart(samples) {
    const svg = $("chart"), W = 600, H = 160, ns = "http://www.w3.org/2000/svg";
    const nodes = [];
    for (const f of [0.25, 0.5, 0.75]) {
      const g = document.createElementNS(ns, "line");
      g.setAttribute("class", "grid");
      g.setAttribute("x1", 0); g.setAttribute("x2", W); g.setAttribute("y1", H * f); g.setAttribute("y2", H * f);
      nodes.push(g);
    }
    if (samples.length > 1) {
      const t0 = ms(samples[0][0]), t1 = ms(samples[samples.length - 1][0]);
      const span = Math.max(t1 - t0, 1);
      const maxLag = Math.max(1, ...samples.map((s) => s[1]));
      const maxPending = Math.max(1, ...samples.map((s) => s[2]));
      const line = (i, max, cls) => {
        const pts = samples.map((s) => `${((ms(s[0]) - t0) / span * W).toFixed(1)},${(H - 4 - s[i] / max * (H - 8)).toFixed(1)}`);
        const pl = document.createElementNS(ns, "polyline");
        pl.setAttribute("points", pts.join(" "));
        pl.setAttribute("class", cls);
        return pl;
      };
      nodes.push(line(2, maxPending, "pendline"), line(1, maxLag, "lagline"));
      $("chart-legend").textContent = `${when(samples[0][0])} – ${when(samples[samples.length - 1][0])}: ` +
        `lag (blue) up to ${seconds(maxLag)}, pending events (grey) up to ${count(maxPending)}; ` +
        `${samples.length} samples recorded by sync`;
    } else {
      $("chart-legend").textContent = "no lag samples yet: sync records one every few seconds while it runs";
    }
    svg.replaceChildren(...nodes);
  }

  function renderChecklist(c) {
    const go = $("go");
    if (!c) {
      go.textContent = ""; go.className = "badge";
      fill($("checklist").tBodies[0]);
      $("checklist-at").textContent = "evaluated once the copy has finished";
      return;
    }
    go.textContent = c.go ? "GO" : "NO GO";
    go.className = "badge " + (c.go ? "go" : "nogo");
    fill($("checklist").tBodies[0], (c.items || []).map((i) =>
      el("tr", {}, el("td", { class: i.state }, i.state), el("td", {}, i.item), el("td", {}, i.detail))));
    $("checklist-at").textContent = (c.error ? c.error + "; " : "") +
      `for the ${c.for}, evaluated ${when(c.at)}`;
  }

  function renderAttempts(attempts) {
    if (!attempts.length) { fill($("attempts"), el("p", { class: "muted" }, "no cutover yet")); return; }
    fill($("attempts"), attempts.slice().reverse().map((a) => {
      const rows = a.steps.map((s) => {
        const key = `${a.id}:${s.step}`;
        if (!(key + ":started" in seen)) seen[key + ":started"] = Date.now();
        if (s.finished_at && !(key + ":finished" in seen)) seen[key + ":finished"] = Date.now();
        const took = s.finished_at ? seconds((ms(s.finished_at) - ms(s.started_at)) / 1000) : null;
        return el("tr", { "data-step": s.step }, el("td", {}, s.step), el("td", { class: s.status }, s.status),
          el("td", {}, when(s.started_at)), el("td", { class: "num" },
            took || el("span", { class: "clock-inline", "data-since": s.started_at }, "")),
          el("td", {}, s.detail || ""));
      });
      const done = a.finished_at !== null;
      const head = `${a.kind} attempt ${a.id}: ${a.status}` + (done && a.freeze_seconds !== null
        ? `, write freeze ${seconds(a.freeze_seconds)}` : "") +
        (done && a.pause_seconds !== null ? `, clients paused ${seconds(a.pause_seconds)}` : "") +
        (a.failed_step ? `, stopped at ${a.failed_step}` : "");
      return el("div", { class: "attempt", "data-attempt": a.id }, el("h3", { class: a.status }, head),
        a.error ? el("div", { class: "muted" }, a.error) : null,
        el("table", {}, el("thead", {}, el("tr", {}, ["step", "status", "started", "took", "detail"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows)));
    }));
    const running = attempts.find((a) => a.finished_at === null);
    const clocks = [];
    if (running && running.freeze_started_at) {
      clocks.push(el("div", {}, el("span", { class: "muted" }, "write freeze "),
        el("span", { class: "clock running", id: "freeze-clock", "data-since": running.freeze_started_at }, "")));
    }
    if (running && running.pause_started_at) {
      clocks.push(el("div", {}, el("span", { class: "muted" }, "clients paused "),
        el("span", { class: "clock running", id: "pause-clock", "data-since": running.pause_started_at }, "")));
    }
    const last = attempts[attempts.length - 1];
    if (!running && last && last.freeze_seconds !== null) {
      clocks.push(el("div", {}, el("span", { class: "muted" }, `last ${last.kind}: write freeze `),
        el("span", { class: "clock", id: "freeze-clock" }, seconds(last.freeze_seconds))));
    }
    fill($("clocks"), clocks);
  }

  function renderActions(v) {
    const h = v.hold;
    fill($("hold"), h ? el("div", { class: "intent" }, `Hold: ${h.reason}, since ${when(h.since)}`) : null);
    fill($("intents"), (v.intents || []).map((i) => el("div", { class: "intent" },
      `${i.what} (since ${when(i.since)}). ${i.how}.`)));
    // Buttons are updated in place (a button replaced under the pointer would lose its click).
    const box = $("actions");
    for (const a of v.actions || []) {
      let b = box.querySelector(`button[data-action="${a.name}"]`);
      if (!b) {
        b = el("button", { type: "button", "data-action": a.name,
          class: ["cutover", "rollback", "release"].includes(a.name) ? "danger" : null }, a.label);
        box.append(b);
      }
      b.disabled = !a.enabled;
      b.title = a.why_not || a.label;
    }
  }

  function renderTables(tables, copy) {
    fill($("tables").tBodies[0], tables.map((t) => el("tr", {},
      el("td", {}, t.table), el("td", { class: t.status === "copied" ? "done" : "running" }, t.status),
      el("td", { class: "num" }, `${t.chunks_done}/${t.chunks}`), el("td", { class: "num" }, bytes(t.bytes)),
      el("td", { class: "num" }, t.seconds_left === null ? "" : seconds(t.seconds_left)),
      el("td", { class: "num" }, count(t.rows)), el("td", { class: "num" }, count(t.pending)))));
    $("copy-summary").textContent = copy.tables === undefined ? "" :
      `${copy.copied}/${copy.tables} tables copied, ${bytes(copy.bytes)}` +
      (copy.chunks ? `, chunks ${copy.chunks_copied}/${copy.chunks}` : "") + (copy.paused ? " — PAUSED" : "");
  }

  function renderAudit(actions) {
    fill($("audit").tBodies[0], actions.slice().reverse().map((a) => el("tr", { "data-audit": a.id },
      el("td", {}, when(a.at)), el("td", {}, a.actor), el("td", {}, a.via),
      el("td", {}, a.action + (a.arguments && a.arguments.overrides && a.arguments.overrides.length
        ? ` --override ${a.arguments.overrides.join(" ")}` : "")),
      el("td", { class: a.outcome }, a.outcome), el("td", { class: "num" }, a.seconds === null ? "" : seconds(a.seconds)),
      el("td", {}, a.detail || ""))));
  }

  // Running clocks: every element with data-since shows the time since then, on the server's clock.
  function tick() {
    for (const node of document.querySelectorAll("[data-since]")) {
      node.textContent = seconds(Math.max(0, (now() - ms(node.getAttribute("data-since"))) / 1000));
    }
  }
  setInterval(tick, 100);

  // --- actions --------------------------------------------------------------------------------------------------

  $("actions").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button || button.disabled) return;
    const a = view.actions.find((x) => x.name === button.dataset.action);
    pending = a;
    $("confirm-what").textContent = `${a.label}: ${a.why_not ? "" : "this acts on the databases now."}`;
    $("confirm-text").textContent = a.confirm;
    $("confirm-input").value = "";
    fill($("confirm-overrides"), a.overrides.length ? [el("div", { class: "muted" }, "Accept failing items by name:"),
      a.overrides.map((o) => el("label", {}, el("input", { type: "checkbox", value: o }), ` ${o} `))] : null);
    $("confirm").hidden = false;
    $("confirm-input").focus();
  });

  $("confirm-cancel").addEventListener("click", () => { $("confirm").hidden = true; pending = null; });

  $("confirm").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!pending) return;
    const overrides = [...$("confirm-overrides").querySelectorAll("input:checked")].map((i) => i.value);
    const result = $("result");
    result.className = ""; result.textContent = `${pending.label}…`;
    try {
      const headers = { "Content-Type": "application/json" };
      const token = $("token").value.trim();  // read when sent: the field is the one place it is kept
      if (token) headers["X-Migrator-Token"] = token;
      const r = await fetch(`/api/actions/${pending.name}`, { method: "POST", headers, cache: "no-store",
        body: JSON.stringify({ confirm: $("confirm-input").value, overrides }) });
      const body = await r.json();
      result.className = r.ok ? "ok" : "error";
      result.textContent = r.ok ? (body.said || `${body.started || body.done} started (pid ${body.pid})`)
        : `${body.error}${body.hint ? " — " + body.hint : ""}`;
      if (r.ok) { $("confirm").hidden = true; pending = null; }
    } catch (err) {
      result.className = "error"; result.textContent = `the console did not answer: ${err}`;
    }
  });

  // --- the stream -----------------------------------------------------------------------------------------------

  function connect() {
    const source = new EventSource("/api/events");
    source.addEventListener("clock", (e) => { offset = ms(e.data) - Date.now(); tick(); });
    source.addEventListener("view", (e) => {
      $("live").textContent = "live"; $("live").className = "live";
      render(JSON.parse(e.data));
    });
    source.onerror = () => { $("live").textContent = "reconnecting…"; $("live").className = "live off"; };
  }
  connect();
})();
