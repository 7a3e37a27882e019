"""The WebUI's Train tab over its API (issue 15): ``create/embedding``, ``create/hypernetwork``,
``train/embedding`` and ``train/hypernetwork``, each an ordinary training job (`/v1/trainings`).

Like the WebUI, a call answers when the work is done (``{"info": ...}`` in its words); unlike it, the farm keeps the
job if the client goes away, and nothing else waits behind it. ``create/*`` is a training of 0 steps: the file with
its starting vectors or modules. ``train/*`` goes on training the named file and writes it back under its name, as
the WebUI does. ``data_root`` names a dataset of yours (`POST /v1/datasets`): the farm reads no server folders.
Options the farm has no use for (``log_directory``, ``varsize``, ``use_weight``, ...) are accepted and ignored, as
WebUI clients send them all.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep, StoreDep
from api.limits import SDAPI_CREATE_LIMITS
from api.routes.sdapi.generate import wait_for_job
from api.sdapi.auth import SdapiKey
from api.submission.training import submit_training
from shared.db.models import ApiKey
from shared.db.session import get_session_factory
from shared.errors import FieldError
from shared.jobs import repository
from shared.jobs.states import JobStatus
from shared.jobs.training_schemas import TrainingRequest
from shared.settings import Settings
from shared.storage.base import ObjectStore

router = APIRouter()
TRAIN_NAMES = {"dataset": "data_root"}  # the farm's field -> the WebUI's, in error locations


class InfoResponse(BaseModel):
    info: str


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")  # the WebUI's clients send every option of the tab


class CreateEmbeddingBody(_Lenient):
    name: str
    num_vectors_per_token: int = 1
    overwrite_old: bool = False
    init_text: str = "*"


class CreateHypernetworkBody(_Lenient):
    name: str
    enable_sizes: list[int] = Field(default_factory=lambda: [768, 320, 640, 1280])
    overwrite_old: bool = False
    layer_structure: str | list[float] | None = None
    activation_func: str | None = None
    weight_init: str | None = None
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str | list[float] | None = None


class TrainBody(_Lenient):
    learn_rate: str | float = "0.005"
    batch_size: int = 1
    gradient_step: int = 1
    data_root: str = Field(description="a dataset id of yours (POST /v1/datasets)")
    training_width: int = 512
    training_height: int = 512
    steps: int = 100000
    clip_grad_mode: str = "disabled"
    clip_grad_value: str | float = "0.1"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    create_image_every: int = 500
    template_filename: str | None = None
    preview_prompt: str = ""
    preview_steps: int = 20
    preview_cfg_scale: float = 7.0
    seed: int = -1


class TrainEmbeddingBody(TrainBody):
    embedding_name: str
    save_embedding_every: int = 500


class TrainHypernetworkBody(TrainBody):
    hypernetwork_name: str
    save_hypernetwork_every: int = 500


def _timeout(settings: Settings) -> float:
    if settings.jobs.sdapi_timeout:
        return settings.jobs.sdapi_timeout
    return float(settings.training.training_time_limit * settings.jobs.max_attempts + 60)


def _submit(fields: dict[str, Any], key: ApiKey, settings: Settings, store: ObjectStore,
            names: dict[str, str]) -> uuid.UUID:
    """The training job; an error names the WebUI's field (``names``: farm field -> WebUI field)."""
    def webui(field: str, message: str) -> FieldError:
        return FieldError(("body", names.get(field, field)), message)

    try:
        request = TrainingRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else "body"
        raise webui(field, error["msg"]) from exc
    with get_session_factory()() as session:
        try:
            return submit_training(session, key, request, settings, store).job.id
        except FieldError as exc:
            raise webui(str(exc.field[1]) if len(exc.field) > 1 else "body", exc.message) from exc


def _outcome(job_id: uuid.UUID) -> tuple[JobStatus, dict[str, Any], str | None]:
    with get_session_factory()() as session:
        job = repository.get_job(session, job_id)
        if job is None:
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, detail=f"training {job_id} disappeared")
        return JobStatus(job.status), dict(job.training or {}), job.error_message


async def _run(fields: dict[str, Any], key: ApiKey, settings: Settings, store: ObjectStore, done: str,
               names: dict[str, str]) -> JSONResponse:
    """Submit, wait for the end, answer ``{"info": ...}`` as the WebUI words it (``done`` names the file)."""
    job_id = await run_in_threadpool(_submit, fields, key, settings, store, names)
    headers = {"X-Renderfarm-Job-Id": str(job_id)}
    timeout = _timeout(settings)
    if not await wait_for_job(job_id, timeout):
        raise HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, headers=headers,
                            detail=f"training {job_id} did not finish within {timeout:.0f}s; it keeps running: "
                                   f"GET /v1/trainings/{job_id}")
    state, training, error = await run_in_threadpool(_outcome, job_id)
    result = training.get("result") or {}
    if state == JobStatus.SUCCEEDED:
        return JSONResponse({"info": done.format(file=f"models/{result.get('file')}", error=None)}, headers=headers)
    if state == JobStatus.CANCELED:
        return JSONResponse({"info": f"training interrupted at step {training.get('step', 0)}; its last checkpoint "
                                     f"is kept (GET /v1/trainings/{job_id})"}, headers=headers)
    return JSONResponse({"info": done.format(file=None, error=error), "error": error, "job_id": str(job_id)},
                        status_code=500, headers=headers)


async def _train(body: TrainBody, kind: str, name: str, save_every: int, key: ApiKey, settings: Settings,
                 store: ObjectStore) -> JSONResponse:
    """The WebUI's train/<kind>: go on training the named file (written back under its name), the WebUI's own
    options mapped onto the farm's, errors named by the WebUI's fields."""
    fields = dict(kind=kind, name=name, start_from=name, overwrite_old=True, dataset=body.data_root,
                  steps=body.steps, learn_rate=str(body.learn_rate), batch_size=body.batch_size,
                  gradient_step=body.gradient_step, clip_grad_mode=body.clip_grad_mode,
                  clip_grad_value=body.clip_grad_value, training_width=body.training_width,
                  training_height=body.training_height, shuffle_tags=body.shuffle_tags,
                  tag_drop_out=body.tag_drop_out, create_image_every=body.create_image_every, save_every=save_every,
                  template_filename=body.template_filename, preview_prompt=body.preview_prompt,
                  preview_steps=body.preview_steps, preview_cfg_scale=body.preview_cfg_scale, seed=body.seed)
    names = {**TRAIN_NAMES, "name": f"{kind}_name", "start_from": f"{kind}_name", "save_every": f"save_{kind}_every"}
    return await _run(fields, key, settings, store,
                      f"train {kind} complete: filename: {{file}} error: {{error}}", names)


@router.post("/create/embedding", response_model=InfoResponse, dependencies=SDAPI_CREATE_LIMITS)
async def create_embedding(body: CreateEmbeddingBody, key: SdapiKey, settings: SettingsDep,
                           store: StoreDep) -> JSONResponse:
    fields = dict(kind="embedding", name=body.name, steps=0, nvpt=body.num_vectors_per_token,
                  overwrite_old=body.overwrite_old, init_text=body.init_text)
    return await _run(fields, key, settings, store, "create embedding filename: {file}",
                      {"nvpt": "num_vectors_per_token"})


@router.post("/create/hypernetwork", response_model=InfoResponse, dependencies=SDAPI_CREATE_LIMITS)
async def create_hypernetwork(body: CreateHypernetworkBody, key: SdapiKey, settings: SettingsDep,
                              store: StoreDep) -> JSONResponse:
    fields = dict(kind="hypernetwork", name=body.name, steps=0, enable_sizes=body.enable_sizes,
                  overwrite_old=body.overwrite_old, layer_structure=body.layer_structure,
                  activation_func=body.activation_func, weight_init=body.weight_init,
                  add_layer_norm=body.add_layer_norm, use_dropout=body.use_dropout,
                  dropout_structure=body.dropout_structure)
    return await _run(fields, key, settings, store, "create hypernetwork filename: {file}", {})


@router.post("/train/embedding", response_model=InfoResponse, dependencies=SDAPI_CREATE_LIMITS)
async def train_embedding(body: TrainEmbeddingBody, key: SdapiKey, settings: SettingsDep,
                          store: StoreDep) -> JSONResponse:
    return await _train(body, "embedding", body.embedding_name, body.save_embedding_every, key, settings, store)


@router.post("/train/hypernetwork", response_model=InfoResponse, dependencies=SDAPI_CREATE_LIMITS)
async def train_hypernetwork(body: TrainHypernetworkBody, key: SdapiKey, settings: SettingsDep,
                             store: StoreDep) -> JSONResponse:
    return await _train(body, "hypernetwork", body.hypernetwork_name, body.save_hypernetwork_every, key, settings,
                        store)
