// The WebUI's infotext read into form fields. `parseInfotext` follows shared/webui/infotext.py's parse_infotext (the
// WebUI's parse_generation_parameters) for what the form uses; `/v1/png-info` answers the same shape for an image,
// so a pasted text and a dropped PNG go through the same `infotextToParams`.

const PARAM = /\s*([\p{L}\p{N}_][\p{L}\p{N}_ \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/gu;
const IMAGE_SIZE = /^(\d+)x(\d+)$/;
// The WebUI's schedule types, label then aliases (modules/sd_schedulers.py), tried in this order.
const SCHEDULE_TYPES = [
  ["Automatic"], ["Uniform"], ["Karras"], ["Exponential"], ["Polyexponential"],
  ["SGM Uniform", "sgm_uniform", "SGMUniform"], ["KL Optimal", "kl_optimal"], ["Align Your Steps", "align_your_steps"],
  ["Simple"], ["Normal"], ["DDIM"], ["Beta"],
];

function unquote(value) {
  if (value.length < 2 || value[0] !== '"' || value[value.length - 1] !== '"') return value;
  try {
    const decoded = JSON.parse(value);
    return typeof decoded === "string" ? decoded : value;
  } catch {
    return value;
  }
}

/** "DPM++ 2M Karras" with no Schedule type: sampler "DPM++ 2M", schedule "Karras" (the WebUI before 1.9). */
function splitLegacySampler(res, samplerKey, scheduleKey) {
  let name = res[samplerKey];
  if (scheduleKey in res || typeof name !== "string") return;
  let found = null;
  for (const [label, ...aliases] of SCHEDULE_TYPES) {
    for (const option of [label, label.toLowerCase(), ...aliases]) {
      if (name.endsWith(` ${option}`)) {
        found = label;
        name = name.slice(0, -option.length - 1);
        break;
      }
    }
  }
  if (found !== null) {
    res[samplerKey] = name;
    res[scheduleKey] = found;
  }
}

/** Prompt, "Negative prompt" and each key of the last line (when it holds at least three), as strings. */
export function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let lastLine = lines.pop() ?? "";
  if ([...lastLine.matchAll(PARAM)].length < 3) {
    lines.push(lastLine);
    lastLine = "";
  }
  let prompt = "";
  let negative = "";
  let inNegative = false;
  for (let line of lines) {
    line = line.trim();
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      line = line.slice("Negative prompt:".length).trim();
    }
    if (inNegative) negative += (negative ? "\n" : "") + line;
    else prompt += (prompt ? "\n" : "") + line;
  }
  const res = {};
  for (const match of lastLine.matchAll(PARAM)) {
    const key = match[1];
    let value = match[2];
    if (!value) continue;
    if (value[0] === '"' && value[value.length - 1] === '"') value = unquote(value);
    const size = IMAGE_SIZE.exec(value);
    if (size) [res[`${key}-1`], res[`${key}-2`]] = [size[1], size[2]];
    else res[key] = value;
  }
  res.Prompt = prompt;
  res["Negative prompt"] = negative;
  res["Clip skip"] ??= "1";
  splitLegacySampler(res, "Sampler", "Schedule type");
  res["Schedule type"] ??= "Automatic";
  return res;
}

const NUMBERS = {
  Steps: "steps", "CFG scale": "cfg_scale", Seed: "seed", "Size-1": "width", "Size-2": "height",
  "Clip skip": "clip_skip", "Denoising strength": "denoising_strength", "Hires upscale": "hr_scale",
  "Hires steps": "hr_second_pass_steps", "Hires resize-1": "hr_resize_x", "Hires resize-2": "hr_resize_y",
};
const TEXTS = { Prompt: "prompt", "Negative prompt": "negative_prompt", Sampler: "sampler_name",
  "Schedule type": "scheduler", "Hires upscaler": "hr_upscaler" };

/** Parsed infotext (ours or /v1/png-info's `parameters`) as job fields; `model` is the infotext's name or hash. */
export function infotextToParams(parsed) {
  const params = {};
  for (const [key, field] of Object.entries(TEXTS)) if (parsed[key] != null) params[field] = String(parsed[key]);
  for (const [key, field] of Object.entries(NUMBERS)) {
    const value = Number(parsed[key]);
    if (parsed[key] != null && parsed[key] !== "" && Number.isFinite(value)) params[field] = value;
  }
  if (parsed.Model || parsed["Model hash"]) params.model = { name: parsed.Model, hash: parsed["Model hash"] };
  // The WebUI ticks hires fix when the text has a denoising strength and any hires value.
  params.enable_hr = "Denoising strength" in parsed && ("Hires upscale" in parsed || "Hires upscaler" in parsed
    || Number(parsed["Hires resize-1"] || 0) > 0);
  return params;
}
