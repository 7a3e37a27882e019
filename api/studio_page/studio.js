// The studio: txt2img and img2img with the WebUI's fields, the prompt dictionary, live progress, a gallery.
// No framework, no build step. Form fields carry the job's field names (`name="cfg_scale"`), so a job's params, an
// infotext and a character's settings all fill the form through `fillForm`, and `readForm` is the job's body.

import { setupDictionary } from "./dictionary.js";
import { setupGallery, showGallery } from "./gallery.js";
import { infotextToParams, parseInfotext } from "./infotext.js";
import {
  $, AuthError, api, dropKey, el, fillSelect, followEvents, getKey, imageFileName, safeUrl, setKey,
} from "./lib.js";

const TERMINAL = ["succeeded", "failed", "canceled"];
const NUMERIC_SELECTS = ["resize_mode"];
const HIRES_FIELDS = ["hr_upscaler", "hr_second_pass_steps", "hr_scale", "hr_resize_x", "hr_resize_y"];
const form = $("gen-form");
const catalog = { models: [], samplers: [] };
let mode = "txt2img";
let lastSeed = null;
let initRef = null; // the img2img init image, as `upload:<id>`
let watching = null; // { id, abort } of the job whose progress shows

// ---- the form ------------------------------------------------------------------------------------

/** Job fields in the form: named inputs, except the dictionary's own and those of the other mode's panels. */
function jobFields() {
  return [...form.elements].filter((f) => {
    const panel = f.closest("[data-mode]");
    return f.name && !f.name.startsWith("dict-") && (!panel || panel.dataset.mode === mode);
  });
}

function readForm() {
  const body = { mode };
  for (const field of jobFields()) {
    if (field.type === "checkbox") body[field.name] = field.checked;
    else if (field.multiple) body[field.name] = [...field.selectedOptions].map((o) => o.value);
    else if (field.value === "") continue;
    else if (field.type === "number" || NUMERIC_SELECTS.includes(field.name)) body[field.name] = Number(field.value);
    else body[field.name] = field.value;
  }
  if (mode === "txt2img" && !body.enable_hr) {
    for (const name of [...HIRES_FIELDS, "denoising_strength"]) delete body[name];
  }
  return body;
}

function findModel(wanted) {
  const { name, hash } = typeof wanted === "object" && wanted ? wanted : { name: wanted };
  const stem = (s) => String(s || "").replace(/\.(safetensors|ckpt)$/, "").replace(/ \[[0-9a-f]+\]$/, "");
  return catalog.models.find((m) => hash && m.hash && (m.hash.startsWith(hash) || hash.startsWith(m.hash)))
    || catalog.models.find((m) => name && [m.name, m.filename, m.title].some((v) => stem(v) === stem(name)));
}

/** Set the form from job fields; answers what it could not set (an unknown model or sampler). */
function fillForm(params) {
  const missed = [];
  if ("sampler_name" in params) {
    const wanted = params.sampler_name;
    const known = catalog.samplers.find((s) => s.name === wanted || s.aliases.includes(wanted));
    if (known) $("sampler_name").value = known.name;
    else missed.push(`sampler ${params.sampler_name}`);
    updateSchedules();
  }
  for (const [name, value] of Object.entries(params)) {
    if (value == null || name === "sampler_name") continue;
    if (name === "model") {
      const model = findModel(value);
      if (model) $("model").value = model.name;
      else missed.push(`model ${typeof value === "object" ? value.name || value.hash : value}`);
      continue;
    }
    for (const field of form.querySelectorAll(`[name="${name}"]`)) {
      if (field.type === "checkbox") field.checked = Boolean(value);
      else if (field.multiple) [...field.options].forEach((o) => { o.selected = [].concat(value).includes(o.value); });
      else if (field.tagName === "SELECT" && ![...field.options].some((o) => o.value === String(value))) {
        missed.push(`${name} ${value}`);
      } else field.value = String(value);
    }
  }
  showToggles();
  note(missed.length ? `Not on this farm, kept as it was: ${missed.join(", ")}` : "");
  return missed;
}

/** The collapsed hires fix and ControlNet panels say whether they are on. */
function showToggles() {
  $("hires-state").textContent = form.elements.enable_hr.checked ? "on" : "";
  $("cn-state").textContent = $("cn-enabled").checked ? "on" : "";
}

function note(text) {
  $("form-note").textContent = text;
}

function updateSchedules() {
  const sampler = catalog.samplers.find((s) => s.name === $("sampler_name").value);
  fillSelect($("scheduler"), (sampler ? sampler.schedule_types : catalog.schedulers).map((s) => [s]));
}

function setMode(next) {
  mode = next;
  for (const tab of document.querySelectorAll("[data-tab]")) tab.classList.toggle("active", tab.dataset.tab === next);
  for (const panel of form.querySelectorAll("[data-mode]")) panel.hidden = panel.dataset.mode !== next;
  form.hidden = next === "gallery";
  $("gallery").hidden = next !== "gallery";
  if (next === "gallery") showGallery();
}

function insertIntoPrompt(text) {
  const prompt = $("prompt");
  const sep = prompt.value && !/[\s,]$/.test(prompt.value) ? ", " : "";
  prompt.value += sep + text;
}

// ---- catalogs ------------------------------------------------------------------------------------

async function loadCatalogs() {
  const get = (path) => api(path).catch((err) => { if (err instanceof AuthError) throw err; return []; });
  // The models first: they check the key, so a wrong one is refused once, not by every catalog at once.
  const models = await api("/v1/models");
  const [samplers, schedulers, loras, styles, upscalers, cnModels, cnModules] = await Promise.all([
    get("/v1/samplers"), get("/v1/schedulers"), get("/v1/loras"), get("/v1/styles"),
    get("/v1/upscalers"), get("/v1/controlnet/models"), get("/v1/controlnet/modules"),
  ]);
  Object.assign(catalog, { models: models.filter((m) => m.loadable), samplers, schedulers });
  fillSelect($("model"), catalog.models.map((m) => [m.name, m.title]));
  const preferred = catalog.models.find((m) => m.default);
  if (preferred) $("model").value = preferred.name;
  fillSelect($("gallery-model"), [["", "all"], ...catalog.models.map((m) => [m.name])]);
  fillSelect($("sampler_name"), samplers.map((s) => [s.name]));
  if (samplers.some((s) => s.name === "DPM++ 2M")) $("sampler_name").value = "DPM++ 2M";
  updateSchedules();
  if ([...$("scheduler").options].some((o) => o.value === "Karras")) $("scheduler").value = "Karras";
  const usable = loras.filter((l) => !l.refused_reason).map((l) => [l.name]);
  fillSelect($("lora-select"), usable.length ? usable : [["", "none installed"]]);
  $("lora-add").disabled = !usable.length;
  fillSelect($("styles"), styles.map((s) => [s.name]));
  fillSelect($("hr_upscaler"), upscalers.filter((u) => !u.refused_reason).map((u) => [u.name]));
  fillSelect($("cn-model"), cnModels.filter((m) => m.loadable).map((m) => [m.title, m.name]));
  fillSelect($("cn-module"), cnModules.filter((m) => m.available).map((m) => [m.name, m.label]));
}

// ---- images in, images out -------------------------------------------------------------------------

async function upload(blob) {
  const data = new FormData();
  data.append("file", blob, "image.png");
  return (await api("/v1/uploads", { method: "POST", body: data })).ref;
}

async function setInitImage(blob) {
  $("init-hint").textContent = "uploading…";
  try {
    initRef = await upload(blob);
    $("init-preview").src = URL.createObjectURL(blob);
    $("init-preview").hidden = false;
    $("init-hint").textContent = "";
  } catch (err) {
    initRef = null;
    $("init-hint").textContent = err.message;
  }
}

/** An image of a job into img2img, with the job's settings (the WebUI's "Send to img2img"). */
async function sendToImg2img(image, params) {
  fillForm(reusable(params));
  setMode("img2img");
  const resp = await fetch(image.url, { cache: "no-store" }).catch(() => null);
  if (!resp || !resp.ok) {
    $("init-hint").textContent = "could not read the image back (its storage may not allow this page)";
    return;
  }
  await setInitImage(await resp.blob());
}

/** A job's params as form fields: its prompt already holds its styles, so they are not picked again. */
function reusable(params) {
  const { styles: _styles, init_images: _init, mask: _mask, ...rest } = params;
  return rest;
}

function reuseSettings(job) {
  fillForm(reusable(job.params));
  setMode(job.mode === "img2img" ? "img2img" : "txt2img");
}

async function fillFromImageFile(file) {
  const data = new FormData();
  data.append("file", file, file.name || "image.png");
  try {
    const info = await api("/v1/png-info", { method: "POST", body: data });
    if (!info.info) return note("That image carries no generation parameters.");
    fillForm(infotextToParams(info.parameters));
  } catch (err) {
    note(err.message);
  }
}

function showOutput(job) {
  const box = $("output-images");
  if (box.childElementCount === job.images.length && box.dataset.job === job.id) return;
  box.dataset.job = job.id;
  box.replaceChildren(...job.images.map((image) => el("img", {
    src: safeUrl(image.url), alt: `seed ${image.seed}`, title: `seed ${image.seed}`, "data-index": image.index,
    onclick: () => selectOutput(job, image),
  })));
  if (job.images.length) selectOutput(job, job.images[0]);
  else $("output-info").hidden = true;
}

function selectOutput(job, image) {
  $("output-info").hidden = false;
  $("output-seed").textContent = image.seed;
  $("output-download").href = safeUrl(image.url) || "#";
  $("output-download").download = imageFileName(job, image);
  $("output-infotext").textContent = image.infotext;
  $("output-to-img2img").onclick = () => sendToImg2img(image, job.params);
  for (const img of $("output-images").children) {
    img.classList.toggle("selected", img.dataset.index === String(image.index));
  }
}

// ---- a job's progress ------------------------------------------------------------------------------

function showJob(job) {
  const running = job.status === "running";
  $("progress-panel").dataset.job = job.id;
  $("job-status").textContent = job.status;
  $("job-status").className = `status-${job.status}`;
  const parts = [job.id.slice(0, 8)];
  if (job.status === "queued" && job.queue_position != null) parts.push(`queue position ${job.queue_position}`);
  if (running) parts.push(`step ${job.current_step}/${job.total_steps}`);
  if (running && job.eta_seconds != null) parts.push(`ETA ${job.eta_seconds.toFixed(1)} s`);
  if (job.status === "succeeded" && job.render_seconds != null) parts.push(`${job.render_seconds.toFixed(1)} s`);
  $("job-detail").textContent = parts.join(" · ");
  $("job-progress").value = job.status === "succeeded" ? 1 : job.progress || 0;
  $("cancel-btn").disabled = TERMINAL.includes(job.status);
  $("job-error").textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
  showOutput(job);
  if (job.status === "succeeded" && job.seeds.length) lastSeed = job.seeds[0];
}

function watch(job) {
  watching?.abort.abort();
  const abort = new AbortController();
  watching = { id: job.id, abort };
  showJob(job);
  followEvents(job.id, (_event, view) => showJob(view), abort.signal)
    .catch((err) => { if (!abort.signal.aborted) $("job-error").textContent = `progress: ${err.message}`; });
}

async function generate(event) {
  event.preventDefault();
  const body = readForm();
  if (mode === "img2img") {
    if (!initRef) return note("img2img needs an init image.");
    body.init_images = [initRef];
  }
  try {
    if ($("cn-enabled").checked) body.controlnet = [await controlUnit()];
    $("generate-btn").disabled = true;
    watch(await api("/v1/jobs", { method: "POST", body }));
    note("");
  } catch (err) {
    if (err instanceof AuthError) return signOut(err.message);
    note(err.message);
  } finally {
    $("generate-btn").disabled = false;
  }
}

async function controlUnit() {
  const file = $("cn-image").files[0];
  return {
    module: $("cn-module").value || "none", model: $("cn-model").value || "None", weight: Number($("cn-weight").value),
    image: file ? await upload(file) : null,
  };
}

async function cancel() {
  if (!watching) return;
  $("cancel-btn").disabled = true;
  try {
    showJob(await api(`/v1/jobs/${watching.id}/cancel`, { method: "POST" }));
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

// ---- signing in ------------------------------------------------------------------------------------

async function start() {
  await loadCatalogs();
  $("login").hidden = true;
  $("studio").hidden = false;
  await setupDictionary(({ prompt, negative_prompt: negative, settings }) => {
    const { model, model_hash: hash, ...rest } = settings || {};
    const missed = settings ? fillForm({ ...rest, model: { name: model, hash } }) : [];
    $("prompt").value = prompt;
    $("negative_prompt").value = negative;
    note(missed.length ? `Built. Not on this farm, kept as it was: ${missed.join(", ")}` : "Built.");
  });
}

function signOut(message = "") {
  dropKey();
  watching?.abort.abort();
  $("studio").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
}

function wire() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    setKey($("login-key").value.trim());
    $("login-key").value = "";
    try {
      await start();
    } catch (err) {
      signOut(err.message);
    }
  });
  $("logout-btn").addEventListener("click", () => signOut());
  for (const tab of document.querySelectorAll("[data-tab]")) {
    tab.addEventListener("click", () => setMode(tab.dataset.tab));
  }
  form.addEventListener("submit", generate);
  $("cancel-btn").addEventListener("click", cancel);
  $("sampler_name").addEventListener("change", updateSchedules);
  for (const toggle of [form.elements.enable_hr, $("cn-enabled")]) toggle.addEventListener("change", showToggles);
  $("seed-random").addEventListener("click", () => { form.elements.seed.value = "-1"; });
  $("seed-reuse").addEventListener("click", () => {
    if (lastSeed != null) form.elements.seed.value = String(lastSeed);
  });
  $("lora-add").addEventListener("click", () => insertIntoPrompt(`<lora:${$("lora-select").value}:1>`));
  $("paste-btn").addEventListener("click", () => { $("paste-box").hidden = !$("paste-box").hidden; });
  $("paste-apply").addEventListener("click", () => {
    const text = $("paste-text").value;
    if (text.trim()) fillForm(infotextToParams(parseInfotext(text)));
    $("paste-box").hidden = true;
  });
  onFileChosen($("png-file"), fillFromImageFile);
  onFileChosen($("init-file"), setInitImage);
  dropTarget($("png-drop"), fillFromImageFile);
  dropTarget($("init-drop"), setInitImage);
  setupGallery({ reuse: reuseSettings, toImg2img: sendToImg2img, watch: (job) => { setMode("txt2img"); watch(job); } });
}

function onFileChosen(input, onFile) {
  input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); });
}

function dropTarget(node, onFile) {
  node.addEventListener("dragover", (event) => { event.preventDefault(); node.classList.add("over"); });
  node.addEventListener("dragleave", () => node.classList.remove("over"));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    node.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) onFile(file);
  });
}

wire();
if (getKey()) start().catch((err) => signOut(err instanceof AuthError ? err.message : ""));
else $("login").hidden = false;
