"""Each farm route as a `Call`: the request (names as the farm's POST /v1/jobs takes them) and its answer's parser.

Shared by `Client` and `AsyncClient`; nothing here does I/O.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import httpx

from renderfarm_client._http import Call, RequestSpec, error_for, read_json
from renderfarm_client.models import BuiltPrompt, Job, JobPage, Model, ModelFile, StoredModel, Upload

ImageInput = str | bytes | os.PathLike[str]  # base64 / data URL / upload:<id>, raw image bytes, or a file
LONG_POLL_GRACE = 15.0  # a long-poll's timeout is its wait plus this


class JobFields(TypedDict, total=False):
    """The POST /v1/jobs fields with the WebUI's names (the farm's README lists them all); ``extra_fields`` on
    ``submit()`` carries any other."""

    negative_prompt: str
    model: str
    seed: int
    subseed: int
    subseed_strength: float
    steps: int
    cfg_scale: float
    sampler_name: str
    scheduler: str
    width: int
    height: int
    batch_size: int
    n_iter: int
    styles: list[str]
    loras: list[dict[str, Any]]
    vae: str
    clip_skip: int
    init_images: Sequence[ImageInput]
    mask: ImageInput
    denoising_strength: float
    resize_mode: int
    enable_hr: bool
    hr_scale: float
    hr_upscaler: str
    output_format: str
    infotext: str
    override_settings: dict[str, Any]
    batch_invariant: bool
    prompt_builder: dict[str, Any]
    webhook_url: str
    webhook_events: list[str]


def encode_image(value: ImageInput) -> str:
    """An image as the farm's JSON fields take it: strings pass through (base64, data URL, ``upload:<id>``)."""
    if isinstance(value, str):
        return value
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    return base64.b64encode(data).decode("ascii")


def submit(prompt: str | None, fields: Mapping[str, Any], idempotency_key: str | None) -> Call[Job]:
    """POST /v1/jobs. Fields left out (or None) take the farm's own defaults."""
    body: dict[str, Any] = {"prompt": prompt} if prompt is not None else {}
    for name, value in fields.items():
        if value is None:
            continue
        if name == "init_images":
            value = [encode_image(v) for v in value]
        elif name == "mask":
            value = encode_image(value)
        body[name] = value
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    # With a key, sending the same body again returns the same job: safe to repeat after a 5xx or a lost answer.
    spec = RequestSpec("POST", "/v1/jobs", json=body, headers=headers, replay_safe=idempotency_key is not None)
    return Call(spec, _job)


def new_idempotency_key() -> str:
    return f"rfc-{uuid.uuid4()}"


def get_job(job_id: str) -> Call[Job]:
    return Call(RequestSpec("GET", f"/v1/jobs/{job_id}"), _job)


def get_job_tagged(job_id: str) -> Call[tuple[Job, str | None]]:
    """The job and its ETag, which later long-polls send back as If-None-Match."""
    return Call(RequestSpec("GET", f"/v1/jobs/{job_id}"), lambda r: (_job(r), r.headers.get("ETag")))


def poll_job(job_id: str, wait: float, etag: str | None) -> Call[tuple[Job | None, str | None]]:
    """A long-poll: the job once it differs from ``etag`` (or ``wait`` runs out), or (None, etag) on a 304."""
    headers = {"If-None-Match": etag} if etag else {}
    spec = RequestSpec("GET", f"/v1/jobs/{job_id}", params={"wait": f"{wait:g}"} if wait > 0 else None,
                       headers=headers, timeout=wait + LONG_POLL_GRACE, ok_statuses=frozenset({200, 304}))

    def parse(response: httpx.Response) -> tuple[Job | None, str | None]:
        new_etag = response.headers.get("ETag", etag)
        if response.status_code == 304:
            return None, new_etag
        return Job.from_json(read_json(response)), new_etag

    return Call(spec, parse)


def job_events(job_id: str, last_event_id: str | None, read_timeout: float) -> RequestSpec:
    """GET /v1/jobs/{id}/events, read as a stream (the farm sends a keepalive every 15 s)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    return RequestSpec("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=read_timeout)


def cancel(job_id: str) -> Call[Job]:
    return Call(RequestSpec("POST", f"/v1/jobs/{job_id}/cancel"), _job)


def list_jobs(status: str | None, limit: int, offset: int) -> Call[JobPage]:
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if status:
        params["status"] = status

    def parse(response: httpx.Response) -> JobPage:
        data = read_json(response)
        return JobPage(jobs=[Job.from_json(j) for j in data["jobs"]], total=int(data["total"]),
                       limit=int(data["limit"]), offset=int(data["offset"]))

    return Call(RequestSpec("GET", "/v1/jobs", params=params), parse)


def list_models() -> Call[list[Model]]:
    return Call(RequestSpec("GET", "/v1/models"), lambda r: [Model.from_json(m) for m in read_json(r)])


def list_loras() -> Call[list[ModelFile]]:
    return Call(RequestSpec("GET", "/v1/loras"), lambda r: [ModelFile.from_json(m) for m in read_json(r)])


def upload(image: bytes | os.PathLike[str], filename: str | None) -> Call[Upload]:
    if isinstance(image, bytes):
        data, name = image, filename or "image.png"
    else:
        data, name = Path(image).read_bytes(), filename or Path(image).name
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"

    def parse(response: httpx.Response) -> Upload:
        data = read_json(response)
        return Upload(id=str(data["id"]), ref=str(data["ref"]), width=int(data["width"]), height=int(data["height"]))

    return Call(RequestSpec("POST", "/v1/uploads", files={"file": (name, data, media_type)}), parse)


MODEL_CHUNK_BYTES = 64 * 1024 * 1024


def begin_model_upload(kind: str, name: str, size: int) -> Call[tuple[str, int]]:
    """Start a resumable upload into the model store: (its id, the offset to send from)."""
    body = {"kind": kind, "name": name, "size": size}
    return Call(RequestSpec("POST", "/v1/models/uploads", json=body),
                lambda r: (str(read_json(r)["id"]), int(read_json(r)["offset"])))


def send_model_chunk(upload_id: str, offset: int, chunk: bytes) -> Call[tuple[int, StoredModel | None]]:
    """One chunk at ``offset``: (the offset now, the stored model once the last chunk landed). A 409 is the farm
    saying where the upload really is (a chunk sent twice after a lost answer): go on from there."""

    def parse(response: httpx.Response) -> tuple[int, StoredModel | None]:
        if response.status_code == 409 and "Upload-Offset" not in response.headers:
            raise error_for(response)  # the last chunk landed, and another file has the name
        offset_now = int(response.headers.get("Upload-Offset", offset))
        if response.status_code == 409:
            return offset_now, None
        data = read_json(response)
        return (offset_now, StoredModel.from_json(data)) if "sha256" in data else (offset_now, None)

    spec = RequestSpec("PATCH", f"/v1/models/uploads/{upload_id}", content=chunk,
                       headers={"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"},
                       ok_statuses=frozenset({200, 201, 409}))
    return Call(spec, parse)


def read_chunk(path: Path, offset: int, chunk_bytes: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(offset)
        return file.read(chunk_bytes)


def build_prompt(choices: Mapping[str, Any], seed: int | None) -> Call[BuiltPrompt]:
    body: dict[str, Any] = {"choices": dict(choices)}
    if seed is not None:
        body["seed"] = seed
    return Call(RequestSpec("POST", "/v1/prompts/build", json=body), lambda r: BuiltPrompt.from_json(read_json(r)))


def webhook_secret() -> Call[str]:
    return Call(RequestSpec("GET", "/v1/webhook-secret"), lambda r: str(read_json(r)["secret"]))


def download(url: str) -> Call[bytes]:
    """An image URL from a job: signed, so fetched without the API key (relative ones are the farm's own)."""
    return Call(RequestSpec("GET", url, authenticated=not url.startswith(("http://", "https://"))),
                lambda r: r.content)


def image_filename(job_id: str, index: int, url: str) -> str:
    """``<job id>-<index>.<ext>``, the extension taken from the URL's path (the farm names its objects so)."""
    suffix = Path(httpx.URL(url).path).suffix.lower()
    return f"{job_id}-{index}{suffix if suffix in ('.png', '.jpg', '.jpeg', '.webp') else '.png'}"


def _job(response: httpx.Response) -> Job:
    return Job.from_json(read_json(response))
