"""The ``info`` JSON string of a WebUI txt2img/img2img answer, built from a finished farm job.

Clients read seeds, hashes and infotexts from it (``json.loads(result["info"])``), so the keys are
the WebUI's (``Processed.js()`` in ``modules/processing.py``). Values come from the job's
immutable params and its recorded images, so ``info`` always describes what was rendered.
"""

from __future__ import annotations

import json
from typing import Any

from api.sdapi.catalog import hash_cache
from api.sdapi.requests import WebuiBody
from shared.db.models import Job
from shared.jobs.views import ViewedJob
from shared.models.files import VAE_DIR
from shared.settings import Settings
from shared.webui.infotext import INFOTEXT_KEY_ORDER, parse_infotext

__all__ = ["build_info", "job_timestamp"]

# Infotext keys the WebUI keeps in p.extra_generation_params (everything after the fixed keys).
_EXTRA_KEYS = frozenset(INFOTEXT_KEY_ORDER[INFOTEXT_KEY_ORDER.index("Hires checkpoint"):-1])


def job_timestamp(job: ViewedJob) -> str:
    """The WebUI's ``job_timestamp`` format (local time there; UTC here, as every farm timestamp)."""
    return job.created_at.strftime("%Y%m%d%H%M%S")


def _extra_params(parsed: dict[str, object]) -> dict[str, object]:
    extra: dict[str, object] = {}
    for key, value in parsed.items():
        base = key[:-2] if key.endswith(("-1", "-2")) else key
        if base in _EXTRA_KEYS:
            extra[key] = value
    return extra


def _vae_hash(settings: Settings, vae: str | None) -> str | None:
    if not vae:
        return None
    path = settings.models.models_dir / VAE_DIR / vae
    return hash_cache(settings).checkpoint(path) if path.is_file() else None


def build_info(body: WebuiBody, job: Job, settings: Settings, warnings: list[str]) -> dict[str, Any]:
    """The WebUI's info dict for a succeeded job (``json.dumps`` it for the answer)."""
    params = job.params
    images = sorted(job.images, key=lambda image: image.index)
    count = len(images)
    infotexts = [image.infotext for image in images]
    parsed = parse_infotext(infotexts[0]) if infotexts else {}
    subseed = int(params["subseed"])
    vae = params.get("vae")
    return {
        "prompt": body.prompt,
        "all_prompts": [params["prompt"]] * count,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [params["negative_prompt"]] * count,
        "seed": int(params["seed"]),
        "all_seeds": [image.seed for image in images],
        "subseed": subseed,
        "all_subseeds": [subseed + k for k in range(count)],
        "subseed_strength": params["subseed_strength"],
        "width": params["width"],
        "height": params["height"],
        "sampler_name": params["sampler_name"],
        "cfg_scale": params["cfg_scale"],
        "steps": params["steps"],
        "batch_size": params["batch_size"],
        "restore_faces": bool(params.get("restore_faces")),
        "face_restoration_model": "GFPGAN" if params.get("restore_faces") else None,
        "sd_model_name": job.model_name.rsplit("/", 1)[-1],
        "sd_model_hash": job.model_hash,
        "sd_vae_name": vae.rsplit(".", 1)[0] if vae else None,
        "sd_vae_hash": _vae_hash(settings, vae),
        "seed_resize_from_w": params["seed_resize_from_w"],
        "seed_resize_from_h": params["seed_resize_from_h"],
        "denoising_strength": params["denoising_strength"] if job.mode == "img2img" or params.get("enable_hr")
        else None,
        "extra_generation_params": _extra_params(parsed),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": list(params.get("styles") or []),
        "job_timestamp": job_timestamp(job),
        "clip_skip": params["clip_skip"],
        "is_using_inpainting_conditioning": False,
        "version": parsed.get("Version"),
        "scheduler": params["scheduler"],
        "job_id": str(job.id),
        "batch_id": str(job.batch_id) if job.batch_id else None,
        "batch_images": job.batch_images,
        "warnings": warnings,
    }


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info)
