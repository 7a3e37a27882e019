"""What `POST /v1/trainings` takes and what `GET /v1/trainings/{id}` shows (issue 15).

Option names are the WebUI's (its Train tab, `/sdapi/v1/create/*` and `/sdapi/v1/train/*`); the request is resolved
into the training contract (`shared/jobs/training_spec.py:TrainSpec`) by `api/submission/training.py`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.jobs.schemas import ErrorView
from shared.jobs.states import JobStatus

EMBEDDING_ONLY = ("init_text", "nvpt")
HYPERNETWORK_ONLY = ("enable_sizes", "layer_structure", "activation_func", "weight_init", "add_layer_norm",
                     "use_dropout", "dropout_structure")
LORA_ONLY = ("network_dim", "network_alpha", "network_target", "train_text_encoder", "unet_lr", "text_encoder_lr",
             "optimizer_type", "lr_scheduler", "lr_warmup_steps", "enable_bucket", "min_bucket_reso",
             "max_bucket_reso", "bucket_reso_steps")
ONLY = {"embedding": EMBEDDING_ONLY, "hypernetwork": HYPERNETWORK_ONLY, "lora": LORA_ONLY}


class TrainingRequest(BaseModel):
    """A training: what to train (`kind`, `name`), on which images (`dataset`) and checkpoint (`model`), how long
    (`steps`), and the WebUI's options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Literal["embedding", "hypernetwork", "lora"] = Field(
        description="embedding (textual inversion), hypernetwork, or lora (kohya's networks.lora)")
    name: str = Field(min_length=1, max_length=100, description="the output's name (models/embeddings/<name>."
                                                                "safetensors, models/hypernetworks/<name>.pt)")
    dataset: uuid.UUID | None = Field(None, description="a dataset of yours (POST /v1/datasets); needed unless "
                                                         "steps is 0")
    model: str | None = Field(None, max_length=500, description="the base checkpoint (default: the farm's)")
    steps: int = Field(ge=0, description="optimizer steps (the WebUI's max steps); 0 only creates the file, as the "
                                         "WebUI's create embedding / create hypernetwork")
    start_from: str | None = Field(None, max_length=200, description="go on training an existing embedding or "
                                                                     "hypernetwork of this name (its vectors or "
                                                                     "modules, and its structure, are kept)")
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="data order, timesteps and noise; -1: random")
    learn_rate: str | None = Field(None, max_length=500, description="a rate, or the WebUI's schedule "
                                                                     "'0.005:100, 1e-3:1000, 1e-5'; default "
                                                                     "0.005 (embedding), 0.00001 (hypernetwork), "
                                                                     "0.0001 (lora)")
    batch_size: int = Field(1, ge=1, le=64)
    gradient_step: int = Field(1, ge=1, le=1000, description="gradient accumulation steps")
    clip_grad_mode: Literal["disabled", "value", "norm"] = "disabled"
    clip_grad_value: float = Field(0.1, gt=0, le=1e6)
    training_width: int = Field(512, ge=64, multiple_of=8)
    training_height: int = Field(512, ge=64, multiple_of=8)
    template_filename: str | None = Field(None, description="one of the farm's templates (GET /v1/trainings/"
                                                            "templates); default by kind")
    template: list[str] | None = Field(None, max_length=1000, description="your own prompt template's lines "
                                                                          "([name], [filewords]) instead of a file")
    shuffle_tags: bool = False
    tag_drop_out: float = Field(0.0, ge=0, le=1)
    save_every: int = Field(0, ge=0, description="a checkpoint every N steps: a lost worker resumes from the last; "
                                                 "0: at the end only")
    create_image_every: int = Field(0, ge=0, description="a preview image every N steps; 0: none")
    preview_prompt: str = Field("", max_length=5000, description="the previews' prompt; empty: the template's "
                                                                "first line for the dataset's first caption")
    preview_steps: int = Field(20, ge=1, le=150)
    preview_cfg_scale: float = Field(7.0, ge=1, le=30)
    overwrite_old: bool = Field(False, description="replace an existing file of that name")
    init_text: str = Field("*", max_length=1000, description="embedding: the words its vectors start from")
    nvpt: int = Field(1, ge=1, le=75, description="embedding: number of vectors per token")
    enable_sizes: list[int] = Field([768, 320, 640, 1280], min_length=1, description="hypernetwork: modules")
    layer_structure: str | list[float] = Field("1, 2, 1", description="hypernetwork: e.g. '1, 2, 1'")
    activation_func: str = Field("linear", max_length=40)
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: str | list[float] | None = Field(None, description="hypernetwork: e.g. '0, 0, 0.1, 0'")
    network_dim: int = Field(8, ge=1, le=1024, description="lora: the rank")
    network_alpha: float = Field(1.0, gt=0, le=1024, description="lora: scales the update by alpha / dim")
    network_target: Literal["attention", "transformer"] = Field(
        "transformer", description="lora: the UNet's attention projections, or every linear layer of its "
                                   "transformer blocks (kohya's default)")
    train_text_encoder: bool = Field(True, description="lora: train the text encoder's attention and MLP too")
    unet_lr: float | None = Field(None, gt=0, le=10, description="lora: default learn_rate")
    text_encoder_lr: float | None = Field(None, gt=0, le=10, description="lora: default learn_rate")
    optimizer_type: Literal["AdamW", "SGD", "Adafactor"] = "AdamW"
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    enable_bucket: bool = Field(False, description="lora: aspect-ratio buckets (kohya's)")
    min_bucket_reso: int = Field(256, ge=64, le=4096)
    max_bucket_reso: int = Field(1024, ge=64, le=4096)
    bucket_reso_steps: int = Field(64, ge=8, le=512, multiple_of=8)
    priority: int = Field(0, ge=-100, le=100)
    webhook_url: str | None = Field(None, max_length=2000)
    webhook_events: list[str] | None = None

    @field_validator("template")
    @classmethod
    def _lines(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        lines = [line.strip() for line in value if line.strip()]
        if not lines:
            raise ValueError("give at least one non-empty line")
        if any(len(line) > 1000 for line in lines):
            raise ValueError("a line is longer than 1000 characters")
        return lines


class TrainingPreview(BaseModel):
    step: int
    url: str
    prompt: str


class TrainingResult(BaseModel):
    file: str = Field(description="where it is installed, relative to the models folder")
    name: str = Field(description="how prompts name it: the embedding's word, or <hypernet:NAME:1>")
    sha256: str
    size: int


class TrainingView(BaseModel):
    """A training as the farm shows it: a job's status and leases, with its step, loss, ETA and result."""

    id: uuid.UUID
    kind: str
    name: str
    status: JobStatus
    status_seq: int
    model: str
    dataset: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    progress: float
    step: int = Field(description="steps done (survives a resume)")
    steps: int
    loss: float | None = Field(description="the latest step's loss")
    learn_rate: float | None
    eta_seconds: float | None = Field(description="estimated seconds until done, while running")
    losses: list[list[float]] = Field(description="[step, loss] pairs, thinned to at most a few hundred")
    checkpoint_step: int | None = Field(description="the step of the last checkpoint (where a resume starts)")
    previews: list[TrainingPreview]
    result: TrainingResult | None
    probe_loss: list[float] | None = Field(None, description="once done: the loss on a fixed probe batch (fixed "
                                                             "images, timesteps and noise) before and after training")
    params: dict[str, Any]
    error: ErrorView | None
    links: dict[str, str]


class TrainingPage(BaseModel):
    trainings: list[TrainingView]
    total: int
    limit: int
    offset: int
