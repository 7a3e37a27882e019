// The gallery: the signed-in key's jobs, newest first (GET /v1/jobs), a page at a time, filtered by status and
// model; each image with its seed, infotext and a download link, and each job's settings ready to reuse.

import { $, api, el, imageFileName, safeUrl } from "./lib.js";

const PAGE = 12;
let offset = 0;
let actions = null; // { reuse(job), toImg2img(image, params), watch(job) }
let latest = 0; // the newest load's number: an older answer that arrives after it is dropped

function imageCard(job, image) {
  return el("figure", { class: "shot" },
    el("a", { href: safeUrl(image.url), target: "_blank", rel: "noopener" },
      el("img", { src: safeUrl(image.url), alt: `seed ${image.seed}`, loading: "lazy" })),
    el("figcaption", {},
      el("span", { text: `seed ${image.seed}` }),
      el("a", { href: safeUrl(image.url), download: imageFileName(job, image), text: "Download" }),
      el("button", { type: "button", class: "small", text: "Send to img2img",
        onclick: () => actions.toImg2img(image, job.params) })),
    el("details", {}, el("summary", { text: "Infotext" }), el("pre", { text: image.infotext })));
}

function jobCard(job) {
  const active = job.status === "queued" || job.status === "running";
  return el("article", { class: "panel job", "data-job": job.id },
    el("div", { class: "row-inline" },
      el("strong", { class: `status-${job.status}`, text: job.status }),
      el("span", { class: "muted", text: `${new Date(job.created_at).toLocaleString()} · ${job.mode} · ${job.model}` }),
      el("span", { class: "spacer" }),
      active ? el("button", { type: "button", class: "small", text: "Watch", onclick: () => actions.watch(job) })
        : null,
      el("button", { type: "button", class: "small reuse", text: "Reuse these settings",
        onclick: () => actions.reuse(job) })),
    el("p", { class: "prompt", text: job.params.prompt || "" }),
    job.error ? el("p", { class: "error", text: `${job.error.type}: ${job.error.message}` }) : null,
    el("div", { class: "shots" }, ...job.images.map((image) => imageCard(job, image))));
}

async function load() {
  const mine = ++latest;
  const status = $("gallery-status").value;
  const model = $("gallery-model").value;
  const query = new URLSearchParams({ limit: PAGE, offset });
  if (status) query.set("status", status);
  if (model) query.set("model", model);
  try {
    const page = await api(`/v1/jobs?${query}`);
    if (mine !== latest) return; // a newer filter or page was asked for while this one was on its way
    const cards = page.jobs.length ? page.jobs.map(jobCard) : [el("p", { class: "muted", text: "No jobs." })];
    $("gallery-jobs").replaceChildren(...cards);
    const last = Math.min(offset + page.jobs.length, page.total);
    $("gallery-range").textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "";
    $("gallery-prev").disabled = offset === 0;
    $("gallery-next").disabled = last >= page.total;
  } catch (err) {
    if (mine !== latest) return;
    $("gallery-jobs").replaceChildren(el("p", { class: "error", text: err.message }));
  }
}

export function showGallery() {
  load();
}

export function setupGallery(handlers) {
  actions = handlers;
  const refilter = () => { offset = 0; load(); };
  $("gallery-status").addEventListener("change", refilter);
  $("gallery-model").addEventListener("change", refilter);
  $("gallery-prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  $("gallery-next").addEventListener("click", () => { offset += PAGE; load(); });
}
