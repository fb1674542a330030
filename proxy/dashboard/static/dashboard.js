// The dashboard page: one EventSource on /dashboard/events (a JSON snapshot a second, the
// hour's series when they gain a point), drawn as numbers, SVG lines and small tables.
// No library, no build step; nothing inline (the page's CSP allows this origin only).
// Every figure shown also carries its exact value in a data-* attribute (data-value, and
// data-generations / data-units / data-spend / data-count on table rows).

const SVG = "http://www.w3.org/2000/svg";
const W = 600;
const H = 120;
const PAD = 4;
let series = null;

const $ = (selector) => document.querySelector(selector);

function fmt(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString("en");
  return Number(value.toFixed(digits)).toString();
}

function bytes(n) {
  if (!n) return "–";
  const mib = n / 2 ** 20;
  return mib >= 1024 ? `${(mib / 1024).toFixed(2)} GiB` : `${mib.toFixed(1)} MiB`;
}

function ago(unix, now) {
  if (!unix) return "no change since start";
  const s = Math.max(0, Math.round(now - unix));
  if (s < 120) return `changed ${s} s ago`;
  if (s < 7200) return `changed ${Math.round(s / 60)} min ago`;
  return `changed ${new Date(unix * 1000).toISOString().slice(0, 16)}Z`;
}

function setFigure(key, value, text) {
  for (const el of document.querySelectorAll(`[data-key="${key}"]`)) {
    el.dataset.value = value === null || value === undefined ? "" : String(value);
    el.textContent = text;
  }
}

function renderNow(live) {
  const now = live.now;
  setFigure("rps", now.rps, fmt(now.rps));
  setFigure("error_pct", now.error_pct, `${fmt(now.error_pct, 1)} %`);
  document.querySelector('[data-key="error_pct"]').classList.toggle("high", now.error_pct >= 5);
  for (const key of ["p50_ms", "p99_ms", "overhead_p50_ms", "overhead_p99_ms", "upstream_p50_ms", "upstream_p99_ms"]) {
    setFigure(key, now[key], now[key] === null ? "–" : `${fmt(now[key], 1)} ms`);
  }
  for (const key of ["streams_open", "sockets_open", "upstream_in_use", "upstream_idle", "open_fds", "max_fds"]) {
    setFigure(key, now[key], fmt(now[key], 0));
  }
  const state = now.breaker_state;
  setFigure("breaker_state", state, now.breaker_enabled ? state.replace("_", "-") : `${state} (no fallback)`);
  setFigure("breaker_changed_at", now.breaker_changed_at, now.breaker_enabled ? ago(now.breaker_changed_at, live.t) : "FAL_PROXY_FALLBACK is off");
  setFigure("loop_lag_ms", now.loop_lag_ms, `${fmt(now.loop_lag_ms, 1)} ms`);
  setFigure("rss_bytes", now.rss_bytes, bytes(now.rss_bytes));
  const workers = live.workers > 1
    ? `worker pid ${live.pid}, one of ${live.workers}: this worker's figures only`
    : `pid ${live.pid}`;
  $("#scope").textContent = workers;
  $("#updated").textContent = `updated ${new Date(live.t * 1000).toISOString().slice(11, 19)} UTC`;
}

function row(cells, attributes) {
  const tr = document.createElement("tr");
  for (const [name, value] of Object.entries(attributes)) tr.dataset[name] = String(value);
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell;
    if (typeof cell === "string" && /^[\d$.,\s–]+$/.test(cell)) td.className = "num";
    tr.append(td);
  }
  return tr;
}

function fill(table, empty, rows) {
  const body = $(`${table} tbody`);
  body.replaceChildren(...rows);
  $(empty).hidden = rows.length > 0;
}

function renderTables(live) {
  const hour = live.hour;
  const totals = live.totals;
  $("#hour-note").textContent = hour.full
    ? "(last hour)"
    : `(since the start, ${Math.max(1, Math.round((live.t - hour.since) / 60))} min ago: less than an hour)`;
  const apps = [...new Set([...Object.keys(hour.generations), ...Object.keys(hour.billable_units), ...Object.keys(hour.spend_usd)])]
    .filter((app) => (hour.generations[app] || hour.billable_units[app] || hour.spend_usd[app] || totals.generations[app]))
    .sort();
  fill("#apps", "#apps-empty", apps.map((app) => {
    const g = hour.generations[app] ?? 0;
    const u = hour.billable_units[app] ?? 0;
    const s = hour.spend_usd[app];
    return row([app, fmt(g, 0), fmt(u, 3), s === undefined ? "–" : `$${fmt(s, 4)}`], {
      app,
      generations: g,
      units: u,
      spend: s ?? "",
      totalGenerations: totals.generations[app] ?? 0,
      totalUnits: totals.billable_units[app] ?? 0,
      totalSpend: totals.spend_usd[app] ?? "",
    });
  }));
  const reasons = Object.keys(hour.refusals).filter((r) => hour.refusals[r] || totals.refusals[r]).sort();
  fill("#refusals", "#refusals-empty", reasons.map((reason) =>
    row([reason, fmt(hour.refusals[reason], 0)], { reason, count: hour.refusals[reason], total: totals.refusals[reason] ?? 0 })));
  $("#near-note").textContent = live.ids_shown ? "(latest 50; ids shown: you are an admin)" : "(latest 50; by tag: set FAL_PROXY_ADMIN_TOKEN to see ids)";
  fill("#near", "#near-empty", live.near_limits.map((entry) => {
    const who = document.createElement("span");
    who.textContent = entry.caller ?? entry.tag;
    who.title = `tag ${entry.tag}`;
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = entry.of || 1;
    meter.value = entry.used;
    meter.high = (entry.of || 1) * 0.8; // proxy/admission/gate.py NEAR_LIMIT
    const used = document.createElement("span");
    const amount = entry.kind === "budget" ? `$${fmt(entry.used, 4)} of $${fmt(entry.of, 4)}` : `${fmt(entry.used, 0)} of ${fmt(entry.of, 0)}`;
    used.append(`${amount} `, meter);
    // near: the last call was admitted with the limit 80 % used or more; over: refused.
    const state = entry.state === "over" ? "over (refused)" : "near";
    const tr = row([who, entry.limit, state, used, fmt(entry.refused, 0), new Date(entry.at * 1000).toISOString().slice(11, 19)],
      { tag: entry.tag, caller: entry.caller ?? "", limit: entry.limit, state: entry.state, used: entry.used, of: entry.of, refused: entry.refused });
    tr.className = entry.state;
    return tr;
  }));
}

function chart(id, lines, unit, t) {
  const figure = $(`#${id}`);
  figure.querySelector("svg")?.remove();
  figure.querySelector(".legend")?.remove();
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const end = t.length ? t[t.length - 1] : 0;
  const start = end - 3600;
  let max = 0;
  for (const line of lines) for (const v of line.values) if (v !== null && v > max) max = v;
  const top = max > 0 ? max * 1.1 : 1;
  const base = document.createElementNS(SVG, "line");
  for (const [k, v] of Object.entries({ x1: 0, y1: H - PAD, x2: W, y2: H - PAD, class: "axis" })) base.setAttribute(k, v);
  svg.append(base);
  lines.forEach((line, i) => {
    const points = [];
    line.values.forEach((v, j) => {
      if (v === null) return;
      const x = ((t[j] - start) / 3600) * W;
      const y = H - PAD - (v / top) * (H - 2 * PAD - 10);
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
    });
    const polyline = document.createElementNS(SVG, "polyline");
    polyline.setAttribute("points", points.join(" "));
    polyline.setAttribute("class", `s${i % 6}`);
    polyline.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(polyline);
    if (points.length) { // the newest point, visible even alone
      const [x, y] = points[points.length - 1].split(",");
      const dot = document.createElementNS(SVG, "line");
      for (const [k, v] of Object.entries({ x1: x, y1: y, x2: x, y2: y, class: `s${i % 6} dot` })) dot.setAttribute(k, v);
      svg.append(dot);
    }
  });
  figure.append(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  lines.forEach((line, i) => {
    const key = document.createElement("span");
    key.className = `k${i % 6}`;
    const last = [...line.values].reverse().find((v) => v !== null);
    key.textContent = `— ${line.name}${last === undefined ? "" : ` ${fmt(last)}${unit}`}`;
    legend.append(key);
  });
  legend.append(Object.assign(document.createElement("span"), { textContent: `max ${fmt(max)}${unit}; last hour, 10 s points` }));
  figure.append(legend);
}

function renderCharts(tail) {
  if (!series) return;
  // The hour's points, then the live one (from the last 10 s point to now), if any.
  const s = (name) => (tail ? [...series[name], tail[name]] : series[name]);
  const t = s("t");
  chart("chart-rps", [{ name: "req/s", values: s("rps") }], "", t);
  const refusals = Object.keys(tail ? tail.refusals : series.refusals).map((reason) => ({
    name: reason,
    values: [...(series.refusals[reason] ?? series.t.map(() => 0)), ...(tail ? [tail.refusals[reason]] : [])],
  }));
  chart("chart-errors", [{ name: "errors %", values: s("error_pct") }, ...refusals], "", t);
  chart("chart-latency", [
    { name: "p50", values: s("p50_ms") },
    { name: "p99", values: s("p99_ms") },
    { name: "upstream p99", values: s("upstream_p99_ms") },
    { name: "proxy p50", values: s("overhead_p50_ms") },
    { name: "proxy p99", values: s("overhead_p99_ms") },
  ], " ms", t);
  chart("chart-generations", [{ name: "generations", values: s("generations") }], "", t);
  chart("chart-open", [{ name: "streams", values: s("streams") }, { name: "sockets", values: s("sockets") }], "", t);
  chart("chart-process", [{ name: "lag ms", values: s("lag_ms") }, { name: "RSS MiB", values: s("rss_mb") }], "", t);
}

function render(message) {
  const live = message.live;
  if (message.series) series = message.series;
  renderCharts(live.tail);
  renderNow(live);
  renderTables(live);
  const body = document.body.dataset;
  body.requestsTotal = String(live.totals.requests);
  body.errorsTotal = String(live.totals.errors);
  body.idsShown = String(live.ids_shown);
  body.hourFull = String(live.hour.full);
  body.workers = String(live.workers);
  body.pid = String(live.pid);
  body.updated = String(live.seq); // last: a test waiting on it sees everything above done
}

const source = new EventSource("/dashboard/events");
source.onopen = () => {
  const el = $("#connection");
  el.dataset.state = "live";
  el.textContent = "live";
};
source.onerror = () => {
  const el = $("#connection");
  el.dataset.state = "lost";
  el.textContent = "connection lost: retrying";
};
source.onmessage = (event) => render(JSON.parse(event.data));
