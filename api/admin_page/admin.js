// The admin dashboard: polls the admin JSON routes and draws them. No framework, no build step.
// The admin key lives in sessionStorage (this tab only, gone when it closes) and is sent as a
// bearer token; it never appears in a URL. Every value from the server is written with
// textContent, so a prompt or an owner name can never inject markup.
"use strict";

const KEY_NAME = "renderfarm.adminKey";
const REFRESH_MS = 3000;
const STATS_EVERY = 3; // stats (charts) every third refresh
const $ = (id) => document.getElementById(id);

let timer = null;
let tick = 0;
let charts = {};
let openJobId = null;

// ---- HTTP ------------------------------------------------------------------------------------

class AuthError extends Error {}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY_NAME);
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  const resp = await fetch(path, { ...options, headers, cache: "no-store" });
  if (resp.status === 401) throw new AuthError("That key is not valid.");
  if (resp.status === 403) throw new AuthError("That key is not an admin key.");
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${resp.status}`);
  return body;
}

// ---- small DOM helpers -------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function fillTable(id, rows, columns) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns, text: "none" }))]));
}

const setText = (id, value) => { $(id).textContent = value; };

function seconds(s) {
  if (s == null) return "–";
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${(s / 3600).toFixed(1)} h`;
}

const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");
const safeUrl = (url) => (typeof url === "string" && /^(https?:\/\/|\/)/.test(url) ? url : null);

// ---- rendering -----------------------------------------------------------------------------

function renderQueue(q) {
  const db = q.database;
  setText("queued-count", db.queued);
  setText("running-count", db.running);
  setText("broker-waiting", q.broker.waiting ?? `unavailable (${q.broker.error})`);
  setText("broker-unacked", q.broker.unacked ?? "–");
  setText("oldest-age", db.oldest_queued_age_seconds == null ? "–" : seconds(db.oldest_queued_age_seconds));
  setText("oldest-at", db.oldest_queued_at ? `since ${time(db.oldest_queued_at)}` : "\u00a0");
  const badge = $("pause-badge");
  badge.textContent = q.pause.paused ? `paused since ${time(q.pause.paused_at)}` : "taking jobs";
  badge.classList.toggle("paused", q.pause.paused);
  $("pause-btn").disabled = q.pause.paused;
  $("resume-btn").disabled = !q.pause.paused;
  fillTable("models-table", db.by_model.map((m) => el("tr", {},
    el("td", { text: m.model }), el("td", { class: "num", text: m.queued }), el("td", { class: "num", text: m.running }),
    el("td", { text: m.oldest_queued_at ? time(m.oldest_queued_at) : "–" }))), 4);
}

function memoryText(memory) {
  if (!memory) return "–";
  return Object.entries(memory).map(([k, v]) =>
    `${k}: ${typeof v === "number" && v > 1e6 ? (v / 2 ** 30).toFixed(1) + " GiB" : v}`).join(", ");
}

function renderWorkers(fleet) {
  setText("workers-alive", fleet.error ? "?" : fleet.alive);
  setText("workers-lost", fleet.lost);
  fillTable("workers-table", fleet.workers.map((w) => {
    const job = w.current_job;
    const lost = w.state === "lost"; // its job is the one it held when it fell silent
    return el("tr", {},
      el("td", { text: w.name }),
      el("td", { class: `status status-${w.state}`, text: w.state }),
      el("td", { text: w.device ?? "–" }),
      el("td", { text: memoryText(w.memory) }),
      el("td", { class: "wrap", text: (w.models.join(", ") || "–") +
        (w.controlnets && w.controlnets.length ? ` · ControlNet: ${w.controlnets.join(", ")}` : "") +
        (w.upscalers && w.upscalers.length ? ` · upscalers: ${w.upscalers.join(", ")}` : "") }),
      el("td", { class: "wrap", text: w.loras.join(", ") || "–" }),
      el("td", {}, job ? el("button", { class: "link", onclick: () => openJob(job.id),
        text: (lost ? "last: " : "") + job.id.slice(0, 8) }) : "–"),
      el("td", {}, job && !lost && job.progress != null ? el("progress", { max: "1", value: String(job.progress) }) : "–"),
      el("td", { text: `${seconds(w.heartbeat_age_seconds)} ago` }),
      el("td", { class: "num", text: w.jobs_done }),
      el("td", { class: "num", text: w.images_per_second != null ? w.images_per_second.toFixed(2) : "–" }),
      el("td", { class: "num", text: w.batch_jobs > 1 ? `${w.batch_jobs} jobs` : "–" }));
  }), 12);
}

function jobActions(job) {
  const actions = el("td", {});
  if (job.status === "queued" || job.status === "running") {
    actions.append(el("button", { class: "small", text: "Cancel", onclick: (e) => { e.stopPropagation(); act(job.id, "cancel"); } }));
  }
  if (job.status === "failed" || job.status === "canceled") {
    actions.append(el("button", { class: "small", text: "Retry", onclick: (e) => { e.stopPropagation(); act(job.id, "retry"); } }));
  }
  return actions;
}

function renderJobs(list) {
  fillTable("jobs-table", list.jobs.map((job) => {
    const url = safeUrl(job.thumbnail_url);
    return el("tr", { class: "clickable", "data-job": job.id, onclick: () => openJob(job.id) },
      el("td", {}, url ? el("img", { class: "thumb", src: url, alt: "", loading: "lazy" }) : el("div", { class: "thumb-none" })),
      el("td", { text: time(job.created_at) }),
      el("td", { text: job.owner }),
      el("td", { class: "wrap", text: job.model }),
      el("td", { class: "wrap", text: job.prompt, title: job.prompt }),
      el("td", { class: `status status-${job.status}`,
        text: job.status === "running" ? `running ${Math.round(job.progress * 100)}%` : job.status }),
      el("td", { text: seconds(job.duration_seconds) }),
      el("td", { class: "wrap", text: job.error ? `${job.error.type}: ${job.error.message}` : "", title: job.error?.message ?? "" }),
      jobActions(job));
  }), 9);
}

function renderOwners(list) {
  const shown = (policy, name, unit = "") => `${policy[name]}${unit}${policy.overrides.includes(name) ? "*" : ""}`;
  fillTable("owners-table", list.owners.map(({ owner, policy, today, month }) =>
    el("tr", { "data-owner": owner },
      el("td", { text: owner }),
      el("td", { class: "num", text: shown(policy, "weight") }),
      el("td", { class: "num", text: shown(policy, "max_running") }),
      el("td", { class: "num", text: shown(policy, "max_queued") }),
      el("td", { text: `${shown(policy, "rate_burst")} + ${shown(policy, "rate_per_second", "/s")}` }),
      el("td", { text: `${shown(policy, "gpu_seconds_per_day", " s")} · ${shown(policy, "images_per_day", " img")}` }),
      el("td", { text: `${shown(policy, "gpu_seconds_per_month", " s")} · ${shown(policy, "images_per_month", " img")}` }),
      el("td", { class: "num", text: `${today.gpu_seconds.toFixed(1)} s` }),
      el("td", { class: "num", text: today.images }),
      el("td", { class: "num", text: `${month.gpu_seconds.toFixed(1)} s` }),
      el("td", { class: "num", text: month.images }))), 11);
}

function renderStats(stats) {
  setText("hour-images", stats.images);
  setText("hour-failed", stats.failed);
  setText("hour-p50", stats.duration_seconds ? seconds(stats.duration_seconds.p50) : "–");
  setText("hour-batches", stats.batches);
  const sizes = Object.entries(stats.jobs_by_batch_images).map(([size, n]) => [Number(size), n]).sort((a, b) => a[0] - b[0]);
  const jobs = sizes.reduce((sum, [, n]) => sum + n, 0);
  setText("hour-batch-mean", jobs ? (sizes.reduce((sum, [size, n]) => sum + size * n, 0) / jobs).toFixed(1) : "–");
  fillTable("batch-table", sizes.map(([size, n]) =>
    el("tr", {}, el("td", { class: "num", text: size }), el("td", { class: "num", text: n }))), 2);
  fillTable("failures-table", Object.entries(stats.failures_by_type).sort((a, b) => b[1] - a[1]).map(([type, n]) =>
    el("tr", {}, el("td", { text: type }), el("td", { class: "num", text: n }))), 2);
  const tp = stats.throughput;
  const q = stats.queue;
  const perMinute = 60 / tp.bucket_seconds;
  drawChart("throughput", [tp.t, tp.images_per_minute, tp.failed.map((n) => n * perMinute)], [
    { label: "images/min", stroke: "#15803d", fill: "rgba(21,128,61,.25)", paths: uPlot.paths.bars({ size: [0.8, 24] }) },
    { label: "failed jobs/min", stroke: "#b91c1c", width: 2 },
  ]);
  drawChart("queue", [q.t, q.queued, q.running, q.broker_waiting], [
    { label: "queued", stroke: "#d97706", width: 2, spanGaps: false },
    { label: "running", stroke: "#2563eb", width: 2, spanGaps: false },
    { label: "broker waiting", stroke: "#9ca3af", dash: [4, 4], spanGaps: false },
  ]);
}

function drawChart(name, data, series) {
  const box = $(`chart-${name}`);
  const size = { width: Math.max(200, box.clientWidth), height: box.clientHeight - 30 };
  if (!charts[name]) {
    charts[name] = new uPlot({
      ...size,
      series: [{}, ...series],
      axes: [{}, { size: 40, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000] }],
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max)] } },
      legend: { live: false },
      cursor: { drag: { x: false, y: false } },
    }, data, box);
  } else {
    charts[name].setData(data);
  }
}

window.addEventListener("resize", () => {
  for (const [name, chart] of Object.entries(charts)) {
    const box = $(`chart-${name}`);
    chart.setSize({ width: Math.max(200, box.clientWidth), height: box.clientHeight - 30 });
  }
});

// ---- refresh loop ------------------------------------------------------------------------

async function refresh() {
  try {
    const status = $("jobs-filter").value;
    const jobsPath = `/v1/admin/jobs?limit=25${status ? `&status=${encodeURIComponent(status)}` : ""}`;
    const [queue, fleet, jobs] = await Promise.all([api("/v1/admin/queue"), api("/v1/admin/workers"), api(jobsPath)]);
    renderQueue(queue);
    renderWorkers(fleet);
    renderJobs(jobs);
    if (tick++ % STATS_EVERY === 0) {
      const [stats, owners] = await Promise.all([api("/v1/admin/stats?window=1h"), api("/v1/admin/owners")]);
      renderStats(stats);
      renderOwners(owners);
    }
    setText("updated", `updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    setText("updated", `refresh failed: ${err.message}`);
  }
}

function startPolling() {
  clearInterval(timer);
  tick = 0;
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

// ---- actions -------------------------------------------------------------------------------

async function setPaused(paused) {
  try {
    const result = await api(`/v1/admin/queue/${paused ? "pause" : "resume"}`, { method: "POST" });
    setText("action-note", `${paused ? "paused" : "resumed"}; ${result.workers_notified.length} worker(s) acknowledged`);
  } catch (err) {
    setText("action-note", `failed: ${err.message}`);
  }
  refresh();
}

async function act(jobId, action) {
  try {
    const result = await api(`/v1/admin/jobs/${jobId}/${action}`, { method: "POST" });
    const note = action === "retry" ? `retried as ${result.job.id.slice(0, 8)}` : `cancel: ${result.outcome}`;
    setText("action-note", note);
    if (openJobId === jobId) setText("job-note", note);
  } catch (err) {
    setText("action-note", `${action} failed: ${err.message}`);
  }
  refresh();
}

async function openJob(jobId) {
  openJobId = jobId;
  let detail;
  try {
    detail = await api(`/v1/admin/jobs/${jobId}`);
  } catch (err) {
    setText("action-note", `could not open job: ${err.message}`);
    return;
  }
  const job = detail.job;
  setText("job-title", `Job ${job.id}`);
  setText("job-note", "");
  const facts = [
    ["Status", job.status + (detail.cancel_requested && job.status === "running" ? " (cancel requested)" : "")],
    ["Owner", detail.owner], ["Model", `${job.model}${job.model_hash ? ` [${job.model_hash}]` : ""}`],
    ["Created", new Date(job.created_at).toLocaleString()], ["Started", time(job.started_at)],
    ["Finished", time(job.finished_at)], ["Attempt", job.attempt], ["Progress", `${Math.round(job.progress * 100)}%`],
    ["Seeds", job.seeds.join(", ")], ["Error", job.error ? `${job.error.type}: ${job.error.message}` : "–"],
  ];
  $("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
  $("job-images").replaceChildren(...job.images.map((img) => {
    const url = safeUrl(img.url);
    if (!url) return null;
    return el("a", { href: url, target: "_blank", rel: "noopener" },
      el("img", { src: url, alt: `image ${img.index}`, title: img.infotext }));
  }).filter(Boolean));
  $("job-params").textContent = JSON.stringify(job.params, null, 2);
  $("job-cancel").disabled = !(job.status === "queued" || job.status === "running");
  $("job-retry").disabled = !(job.status === "failed" || job.status === "canceled");
  const dialog = $("job-dialog");
  if (!dialog.open) dialog.showModal();
}

// ---- sign in / out -------------------------------------------------------------------------

function showDashboard(show) {
  $("login").hidden = show;
  $("dashboard").hidden = !show;
}

function signOut(message = "") {
  clearInterval(timer);
  sessionStorage.removeItem(KEY_NAME);
  setText("login-error", message);
  showDashboard(false);
  $("login-key").value = "";
  $("login-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_NAME, $("login-key").value.trim());
  try {
    await api("/v1/admin/queue");
  } catch (err) {
    return signOut(err instanceof AuthError ? err.message : `Cannot reach the farm: ${err.message}`);
  }
  setText("login-error", "");
  showDashboard(true);
  startPolling();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("logout-btn").addEventListener("click", () => signOut());
  $("pause-btn").addEventListener("click", () => setPaused(true));
  $("resume-btn").addEventListener("click", () => setPaused(false));
  $("jobs-filter").addEventListener("change", refresh);
  $("job-cancel").addEventListener("click", () => openJobId && act(openJobId, "cancel"));
  $("job-retry").addEventListener("click", () => openJobId && act(openJobId, "retry"));
  $("job-dialog").addEventListener("close", () => { openJobId = null; });
  if (sessionStorage.getItem(KEY_NAME)) {
    showDashboard(true);
    startPolling();
  } else {
    showDashboard(false);
  }
});
