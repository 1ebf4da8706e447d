// Trinity studio's page: runs, curves (uPlot), rollouts, configs. It only polls the JSON API
// (trinity/studio/app.py); every failed request becomes a line in #messages and the page goes on.
"use strict";

const DEFAULT_METRICS = [
  "critic/rewards/mean", "rollout/reward/mean", "response_length/mean",
  "actor/kl_loss", "actor/entropy", "actor/grad_norm",
];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563",
  "#db2777"];
const PAGE = 50;
const params = new URLSearchParams(location.search);

const state = {
  tab: params.get("tab") || "curves",
  runs: [],                       // what /api/runs lists
  checked: new Set((params.get("runs") || "").split(",").filter(Boolean)),
  metrics: new Set((params.get("metrics") || "").split(",").filter(Boolean)),
  data: new Map(),                // run id -> /api/metrics answer
  charts: new Map(),              // metric -> {plot, signature}
  smoothing: 0,
  offset: 0,
  steps: "",                      // signature of the shown run's recorded steps
  poll: Number(params.get("poll")) || 3,
};
const messages = new Map();       // source -> {text, level}

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function say(source, text, level = "error") {
  messages.set(source, { text, level });
  showMessages();
}

function unsay(source) {
  if (messages.delete(source)) showMessages();
}

function showMessages() {
  $("messages").replaceChildren(
    ...[...messages.values()].map((m) => el("li", { class: m.level, textContent: m.text })));
}

// One API call; a failure is said under `source` and returns null, a success clears it.
async function api(source, url, options) {
  try {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    unsay(source);
    return body;
  } catch (error) {
    say(source, `${source}: ${error.message}`);
    return null;
  }
}

function query(path, values) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) {
    for (const item of [].concat(value)) {
      if (item !== undefined && item !== null && item !== "") search.append(key, item);
    }
  }
  return `${path}?${search}`;
}

function remember() {
  const search = new URLSearchParams({ tab: state.tab, runs: [...state.checked].join(",") });
  if (state.metrics.size) search.set("metrics", [...state.metrics].join(","));
  if (params.get("poll")) search.set("poll", params.get("poll"));
  history.replaceState(null, "", `?${search}`);
}

// ---- runs -------------------------------------------------------------------------------------
function color(run) {
  const index = [...state.checked].indexOf(run);
  return COLORS[(index < 0 ? 0 : index) % COLORS.length];
}

async function loadRuns() {
  const runs = await api("runs", "/api/runs");
  if (!runs) return;
  state.runs = runs;
  if (!state.checked.size && runs.length) state.checked.add(runs[0].id);
  $("no-runs").hidden = runs.length > 0;
  $("no-runs").textContent = "No runs yet: a run appears once it logs its first step.";
  $("runs").replaceChildren(...runs.map((run) => {
    const box = el("input", { type: "checkbox", checked: state.checked.has(run.id),
      "data-run": run.id });
    box.addEventListener("change", () => {
      if (box.checked) state.checked.add(run.id); else state.checked.delete(run.id);
      remember();
      refresh();
    });
    const label = el("label", {}, box, el("span", { class: "swatch" }), run.id);
    label.querySelector(".swatch").style.background = state.checked.has(run.id)
      ? color(run.id) : "transparent";
    if (run.live) label.append(el("span", { class: "live", textContent: "live" }));
    return el("li", {}, label);
  }));
  for (const id of ["rollout-run", "config-run"]) fillRunSelect($(id));
}

function fillRunSelect(select) {
  const keep = select.value;
  const ids = [...new Set([...state.checked, ...state.runs.map((r) => r.id)])];
  select.replaceChildren(...ids.map((id) => el("option", { value: id, textContent: id })));
  select.value = ids.includes(keep) ? keep : ids[0] || "";
}

// ---- curves -----------------------------------------------------------------------------------
function smooth(values, weight) {       // as trinity.monitor.plot.smooth (TensorBoard's)
  let last = 0, norm = 0;
  return values.map((value) => {
    last = last * weight + (1 - weight) * value;
    norm = norm * weight + (1 - weight);
    return last / norm;
  });
}

async function loadCurves() {
  const keys = [...state.metrics];
  await Promise.all([...state.checked].map(async (run) => {
    const data = await api(`run ${run}`, query("/api/metrics", { run, key: keys }));
    if (!data) { state.data.delete(run); return; }
    state.data.set(run, data);
    if (data.skipped.length) {
      const lines = data.skipped.join(", ");
      say(`skipped ${run}`, `run ${run}: metrics.jsonl line ${lines} is not a complete record ` +
        "(being written, or cut by a kill): skipped", "warning");
    } else unsay(`skipped ${run}`);
  }));
  for (const run of state.data.keys()) if (!state.checked.has(run)) state.data.delete(run);
  const all = [...new Set([...state.data.values()].flatMap((d) => d.keys))].sort();
  if (!state.metrics.size && all.length) {
    const wanted = DEFAULT_METRICS.filter((key) => all.includes(key));
    for (const key of wanted.length ? wanted : all.slice(0, 3)) state.metrics.add(key);
    return loadCurves();                // now with the series of the chosen metrics
  }
  showMetricList(all);
  drawCharts();
}

function showMetricList(all) {
  const filter = $("metric-filter").value.trim().toLowerCase();
  const shown = all.filter((key) => state.metrics.has(key) || key.toLowerCase().includes(filter));
  $("metrics").replaceChildren(...shown.map((key) => {
    const box = el("input", { type: "checkbox", checked: state.metrics.has(key),
      "data-metric": key });
    box.addEventListener("change", () => {
      if (box.checked) state.metrics.add(key); else state.metrics.delete(key);
      remember();
      loadCurves();
    });
    return el("li", {}, el("label", {}, box, key));
  }));
}

function drawCharts() {
  const holder = $("charts");
  for (const [key, chart] of state.charts) {
    if (!state.metrics.has(key)) { chart.plot.destroy(); chart.node.remove(); state.charts.delete(key); }
  }
  for (const key of state.metrics) {
    let chart = state.charts.get(key);
    const runs = [...state.checked].map((run) => [run, state.data.get(run)])
      .filter(([, d]) => d && d.series[key]);         // in the order the runs were checked
    const steps = [...new Set(runs.flatMap(([, d]) => d.series[key].steps))].sort((a, b) => a - b);
    const width = chart ? chart.node.clientWidth : 0;
    const signature = JSON.stringify([state.smoothing, width,
      runs.map(([run, d]) => [run, color(run), d.series[key].steps.length, d.series[key].values.at(-1)])]);
    if (chart && chart.signature === signature) continue;
    if (!chart) {
      const node = el("div", { class: "chart", "data-metric": key }, el("h3", { textContent: key }));
      holder.append(node);
      chart = { node, plot: null };
      state.charts.set(key, chart);
    }
    chart.signature = signature;
    const series = [{ label: "step" }];
    const data = [steps];
    for (const [run, d] of runs) {
      const { steps: xs, values } = d.series[key];
      const at = new Map(xs.map((x, i) => [x, i]));
      const place = (ys) => steps.map((x) => (at.has(x) ? ys[at.get(x)] : null));
      if (state.smoothing > 0) {
        series.push({ label: `${run} (raw)`, stroke: `${color(run)}40`, spanGaps: true, raw: true });
        data.push(place(values));
      }
      series.push({ label: run, stroke: color(run), width: 2, spanGaps: true });
      data.push(place(smooth(values, state.smoothing)));
    }
    chart.node.dataset.runs = runs.map(([run]) => run).join(",");
    chart.node.dataset.lastStep = steps.length ? steps.at(-1) : "";
    if (chart.plot) chart.plot.destroy();
    chart.plot = new uPlot({
      width: Math.max(300, chart.node.clientWidth),
      height: 220,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: key.split("/").slice(-2).join("/"), size: 60 }],
      series,
    }, data, chart.node);
    const rows = chart.plot.root.querySelectorAll(".u-legend .u-series");
    series.forEach((item, i) => { if (item.raw) rows[i].style.display = "none"; });  // the faint
  }
}

// ---- rollouts ---------------------------------------------------------------------------------
const fmt = (x) => (x === null || x === undefined ? "" : Number(x).toFixed(3).replace(/\.?0+$/, ""));

async function loadSteps() {
  const run = $("rollout-run").value;
  if (!run) return;
  const steps = await api("rollouts", query("/api/steps", { run }));
  if (!steps) { state.steps = ""; return; }
  const signature = `${run} ${JSON.stringify(steps)}`;
  if (signature === state.steps) return;
  state.steps = signature;
  const select = $("rollout-step");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", textContent: "all steps" }), ...steps.map((s) =>
    el("option", { value: s.step, textContent: `${s.step} (${s.count}, reward ${fmt(s.reward)})` })));
  select.value = steps.some((s) => String(s.step) === keep) ? keep : "";
  await Promise.all([loadRollouts(), loadTasks()]);
}

async function loadRollouts() {
  const run = $("rollout-run").value;
  const found = await api("rollouts", query("/api/rollouts", {
    run, step: $("rollout-step").value, search: $("search").value.trim(),
    min_reward: $("min-reward").value, max_reward: $("max-reward").value,
    sort: $("sort").value, limit: PAGE, offset: state.offset,
  }));
  const body = $("rollout-table").querySelector("tbody");
  if (!found) { body.replaceChildren(); $("rollout-count").textContent = ""; return; }
  const last = Math.min(state.offset + PAGE, found.total);
  $("rollout-count").textContent = found.total
    ? `rollouts ${state.offset + 1}-${last} of ${found.total}` : "no rollout matches";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= found.total;
  body.replaceChildren(...found.rollouts.flatMap((r) => {
    const row = el("tr", { class: "row", "data-id": r.id },
      el("td", { textContent: r.step }), el("td", { textContent: r.task_id }),
      el("td", { textContent: fmt(r.reward) }), el("td", { textContent: fmt(r.advantage) }),
      el("td", { textContent: r.response_length + (r.truncated ? " (cut)" : "") }),
      el("td", { textContent: r.model_version }),
      el("td", { class: "text", textContent: r.prompt, title: r.prompt }),
      el("td", { class: "text", textContent: r.response }));
    const details = el("tr", { class: "details", hidden: true }, el("td", { colSpan: 8 },
      el("strong", { textContent: "prompt" }), el("pre", { textContent: r.prompt }),
      el("strong", { textContent: "response" }), el("pre", { textContent: r.response }),
      el("div", { textContent: `reward components ${JSON.stringify(r.reward_components)}` +
        ` · group ${r.group_id}` })));
    row.addEventListener("click", () => { details.hidden = !details.hidden; });
    return [row, details];
  }));
}

async function loadTasks() {
  const run = $("rollout-run").value;
  const tasks = await api("tasks", query("/api/tasks", { run }));
  const select = $("task");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "", textContent: tasks && tasks.length
    ? "choose a task seen at several steps" : "no task was seen at more than one step" }),
  ...(tasks || []).map((t) => el("option", { value: t.prompt,
    textContent: `${t.prompt.slice(0, 70)} (${t.task_id}; ${t.steps} steps, ${t.first_step}-${t.last_step})` })));
  select.value = (tasks || []).some((t) => t.prompt === keep) ? keep : "";
  await loadTask();
}

async function loadTask() {
  const prompt = $("task").value;
  const view = $("task-view");
  if (!prompt) { view.replaceChildren(); return; }
  const task = await api("task", query("/api/task", { run: $("rollout-run").value, prompt }));
  if (!task) return;
  const column = (title, side) => el("div", {}, el("h3", { textContent: `${title}: step ${side.step}` }),
    ...side.rollouts.map((r) => el("div", { class: `answer${r.reward > 0 ? " right" : ""}`,
      textContent: `[reward ${fmt(r.reward)}] ${r.response}` })));
  const diff = el("div", { class: "answer", id: "task-diff" }, ...task.diff.map(([op, text]) =>
    (op === "=" ? document.createTextNode(text) : el(op === "+" ? "ins" : "del", { textContent: text }))));
  view.replaceChildren(el("pre", { textContent: task.prompt }),
    el("div", { class: "columns" }, column("Early", task.early), column("Late", task.late)),
    el("h3", { textContent: `Best answer, step ${task.early.step} → step ${task.late.step}` }), diff);
}

// ---- config -----------------------------------------------------------------------------------
async function loadConfig() {
  const run = $("config-run").value;
  const found = run && await api("config", query("/api/config", { run }));
  $("config-yaml").textContent = found ? found.yaml : "";
}

async function validate() {
  const result = $("validate-result");
  result.replaceChildren(el("span", { class: "muted", textContent: "checking..." }));
  const answer = await api("validate", "/api/validate", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text: $("config-text").value }),
  });
  if (!answer) { result.replaceChildren(); return; }
  const warnings = answer.warnings.map((w) => el("div", { class: "muted", textContent: `warning: ${w}` }));
  result.replaceChildren(...(answer.ok
    ? [el("div", { class: "ok", id: "validate-ok", textContent: "valid: the config as a run would use it" }),
      ...warnings, el("pre", { textContent: answer.yaml })]
    : [el("div", { class: "error", id: "validate-error", textContent: answer.error }), ...warnings]));
}

// ---- wiring -----------------------------------------------------------------------------------
function show(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  for (const section of document.querySelectorAll("main section")) section.hidden = section.id !== tab;
  remember();
  refresh();
}

async function refresh() {
  if (state.tab === "curves") await loadCurves();
  else if (state.tab === "rollouts") await loadSteps();
  else if (state.tab === "config") await loadConfig();
}

async function tick() {
  await loadRuns();
  await refresh();
  $("status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  setTimeout(tick, state.poll * 1000);
}

async function start() {
  const info = await api("studio", "/api/info");
  if (info) {
    $("root").textContent = info.root;
    if (!params.get("poll")) state.poll = info.poll_seconds;
    if (!info.exists) say("root", `${info.root} is not a directory (yet): runs appear when they start`, "warning");
  }
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => show(button.dataset.tab));
  }
  $("smoothing").addEventListener("input", () => {
    state.smoothing = Number($("smoothing").value);
    $("smoothing-value").textContent = state.smoothing.toFixed(2);
    drawCharts();
  });
  $("metric-filter").addEventListener("input", () => loadCurves());
  $("rollout-run").addEventListener("change", () => { state.offset = 0; state.steps = ""; loadSteps(); });
  for (const id of ["rollout-step", "sort", "min-reward", "max-reward", "search"]) {
    $(id).addEventListener("change", () => { state.offset = 0; loadRollouts(); });
  }
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadRollouts(); });
  $("next").addEventListener("click", () => { state.offset += PAGE; loadRollouts(); });
  $("task").addEventListener("change", loadTask);
  $("config-run").addEventListener("change", loadConfig);
  $("validate-button").addEventListener("click", validate);
  $("load-run-config").addEventListener("click", async () => {
    const run = $("config-run").value;
    const found = run && await api("config", query("/api/config", { run }));
    if (found) $("config-text").value = found.yaml;
  });
  window.addEventListener("resize", drawCharts);
  await loadRuns();
  show(state.tab);
  setTimeout(tick, state.poll * 1000);
}

start();
