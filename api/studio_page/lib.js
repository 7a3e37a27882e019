// Helpers the studio's modules share: the API key, JSON calls, the SSE reader, DOM building.
// Every value from the server is written with textContent, so a prompt can never inject markup.

const KEY_NAME = "renderfarm.apiKey";

export const $ = (id) => document.getElementById(id);
export const getKey = () => sessionStorage.getItem(KEY_NAME);
export const setKey = (key) => sessionStorage.setItem(KEY_NAME, key);
export const dropKey = () => sessionStorage.removeItem(KEY_NAME);

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(status, detail) {
    super(errorText(detail) || `HTTP ${status}`);
    this.status = status;
  }
}

/** FastAPI's `detail`: a string, or a list of {loc, msg} (422) shown as "field: message". */
function errorText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  return "";
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${getKey()}`, ...extra };
}

/** A JSON call with the key; `body` (an object) is sent as JSON, a FormData as it is. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
  if (resp.status === 401) throw new AuthError("That key is not valid.");
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, data.detail);
  return data;
}

/**
 * Follow a job's Server-Sent Events until its terminal event. EventSource cannot send the key's header, so this
 * reads the stream with fetch and parses it; a dropped connection resumes with Last-Event-ID.
 */
export async function followEvents(jobId, onEvent, signal) {
  let lastId = null;
  for (let failures = 0; failures < 5 && !signal.aborted;) {
    let ended = false;
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      const resp = await fetch(`/v1/jobs/${jobId}/events`, { headers, signal, cache: "no-store" });
      if (!resp.ok) throw new ApiError(resp.status, (await resp.json().catch(() => ({}))).detail);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!event) continue;
          if (event.id) lastId = event.id;
          failures = 0;
          onEvent(event.event, JSON.parse(event.data));
          if (["succeeded", "failed", "canceled"].includes(event.event)) ended = true;
        }
      }
    } catch (err) {
      if (signal.aborted || err instanceof ApiError) throw err;
    }
    if (ended) return;
    failures += 1;
    await new Promise((resolve) => setTimeout(resolve, 500 * failures));
  }
}

/** One SSE block ("id:", "event:", "data:" lines; ":" starts a comment) or null for a keepalive. */
export function parseEvent(block) {
  const event = { id: null, event: "message", data: null };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = value;
    else if (field === "event") event.event = value;
    else if (field === "data") event.data = event.data === null ? value : `${event.data}\n${value}`;
  }
  return event.data === null ? null : event;
}

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

/** Replace a <select>'s options: items are [value, label] pairs. */
export function fillSelect(select, items, keep = true) {
  const previous = select.value;
  select.replaceChildren(...items.map(([value, label]) => el("option", { value, text: label ?? value })));
  if (keep && items.some(([value]) => value === previous)) select.value = previous;
}

/** The name an image downloads as: `<job id>-<index>.<the job's output_format>` (png unless it says otherwise). */
export const imageFileName = (job, image) => `${job.id}-${image.index}.${job.params?.output_format || "png"}`;

/** Only http(s) and same-origin paths become links or image sources. */
export const safeUrl = (url) => (typeof url === "string" && /^(https?:\/\/|\/)/.test(url) ? url : null);

export function fileAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
