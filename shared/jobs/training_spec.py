"""The training contract: everything a worker needs to train an embedding or a hypernetwork (issue 15).

A training is a farm job (`jobs.mode == "train"`, on the `train` queue, never batched). The API's
`api/submission/training.py` validates the request and resolves it into a :class:`TrainSpec`; the row stores
``spec.to_stored()`` in ``jobs.params``; the worker parses it after the claim. Option names are the WebUI's (its
Train tab and its ``/sdapi/v1/create/*`` and ``/sdapi/v1/train/*`` routes): ``learn_rate``, ``batch_size``,
``gradient_step``, ``clip_grad_mode``, ``training_width``, ``nvpt``, ``layer_structure``, ...

Unknown keys are refused, as the render contract refuses them: a key this worker does not know means a newer API
wrote the row.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TRAIN_MODE = "train"
TrainKind = Literal["embedding", "hypernetwork", "lora"]

# The WebUI's template files (textual_inversion_templates/*.txt), by the names its API takes. Each line is one
# training prompt; `[name]` is the embedding's (or the hypernetwork's) name, `[filewords]` the image's
# caption. These lines are written for the farm in the same spirit; `template` gives your own.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "none.txt": ("picture",),
    "subject.txt": ("a photo of a [name]", "a rendering of a [name]", "a close-up photo of the [name]",
                    "a bright photo of the [name]", "a cropped photo of a [name]"),
    "subject_filewords.txt": ("a photo of a [name], [filewords]", "a rendering of a [name], [filewords]",
                              "a close-up photo of the [name], [filewords]",
                              "a cropped photo of a [name], [filewords]"),
    "style.txt": ("a painting, art by [name]", "a rendering, art by [name]", "a picture, art by [name]"),
    "style_filewords.txt": ("[filewords], art by [name]", "a painting of [filewords], art by [name]",
                            "a picture of [filewords], art by [name]"),
    "hypernetwork.txt": ("[filewords]",),
}
# Hypernetworks and LoRAs learn the captions themselves (kohya trains on the caption text alone).
DEFAULT_TEMPLATE = {"embedding": "subject_filewords.txt", "hypernetwork": "hypernetwork.txt",
                    "lora": "hypernetwork.txt"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}$")
# The WebUI's learning-rate schedule: "rate" or "rate:until_step, rate:until_step, ..., rate".
_SCHEDULE_ENTRY = re.compile(r"^\s*([0-9.eE+-]+)\s*(?::\s*([0-9]+)\s*)?$")


def parse_learn_rate(text: str, steps: int) -> list[tuple[float, int]]:
    """The WebUI's ``learn_rate`` text as (rate, until step) pairs, the last one running to ``steps``; raises
    ValueError naming the part it cannot read. ``"0.005"`` is one rate; ``"0.005:100, 1e-3:1000, 1e-5"`` three."""
    pairs: list[tuple[float, int]] = []
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty: give a rate such as 0.005, or a schedule such as 0.005:100, 0.001")
    for i, part in enumerate(parts):
        match = _SCHEDULE_ENTRY.match(part)
        if match is None:
            raise ValueError(f"cannot read {part.strip()!r}: each part is rate or rate:until_step")
        try:
            rate = float(match.group(1))
        except ValueError as exc:
            raise ValueError(f"cannot read the rate {match.group(1)!r}") from exc
        if not 0 < rate < 10:
            raise ValueError(f"rate {rate} is outside (0, 10)")
        if match.group(2) is None and i != len(parts) - 1:
            raise ValueError(f"{part.strip()!r}: only the last rate may leave out its step")
        # The last rate runs to the end; a schedule longer than the training is cut, as the WebUI cuts it.
        until = int(match.group(2)) if match.group(2) is not None else max(steps, pairs[-1][1] + 1 if pairs else 1)
        if pairs and until <= pairs[-1][1]:
            raise ValueError(f"{part.strip()!r}: steps must increase")
        pairs.append((rate, until))
    return pairs


def rate_at(schedule: list[tuple[float, int]], step: int) -> float:
    """The learning rate for step ``step`` (0-based) of a parsed schedule."""
    for rate, until in schedule:
        if step < until:
            return rate
    return schedule[-1][0]


class DatasetItem(BaseModel):
    """One image of the dataset as the job saw it at submit: its object-store key and caption."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    caption: str = ""


class TrainSpec(BaseModel):
    """One training: what to train, on which images and checkpoint, and the WebUI's options for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    mode: Literal["train"] = "train"
    kind: TrainKind
    name: str = Field(description="the output's name: models/embeddings/<name>.safetensors or "
                                  "models/hypernetworks/<name>.pt")
    model: str = Field(description="the base checkpoint's name in models/Stable-diffusion")
    model_hash: str | None = None
    dataset: str | None = Field(description="the dataset's id (POST /v1/datasets); None only with steps 0")
    items: tuple[DatasetItem, ...] = Field(description="the dataset's images when the job was submitted")
    steps: int = Field(ge=0, description="0: only create the file, as the WebUI's create/embedding and "
                                         "create/hypernetwork do")
    start_from: str | None = Field(None, description="an existing file to go on training (the WebUI's "
                                                     "train/embedding names one), relative to the models folder")
    seed: int = Field(ge=0, description="data order, timesteps and noise; the same seed repeats a training")
    learn_rate: str = "0.005"
    batch_size: int = Field(1, ge=1)
    gradient_step: int = Field(1, ge=1, description="gradient accumulation steps")
    clip_grad_mode: Literal["disabled", "value", "norm"] = "disabled"
    clip_grad_value: float = Field(0.1, gt=0)
    training_width: int = 512
    training_height: int = 512
    template: tuple[str, ...] = Field(description="the prompt template's lines ([name], [filewords])")
    template_filename: str | None = None
    shuffle_tags: bool = False
    tag_drop_out: float = Field(0.0, ge=0, le=1)
    save_every: int = Field(0, ge=0, description="checkpoint (and resume point) every N steps; 0: only at the end")
    create_image_every: int = Field(0, ge=0, description="a preview image every N steps; 0: none")
    preview_prompt: str = ""
    preview_steps: int = Field(20, ge=1)
    preview_cfg_scale: float = 7.0
    preview_sampler_name: str = "Euler"
    overwrite_old: bool = False
    # embeddings: the WebUI's "create embedding"
    init_text: str = "*"
    nvpt: int = Field(1, ge=1, le=75, description="number of vectors per token")
    # hypernetworks: the WebUI's "create hypernetwork"
    enable_sizes: tuple[int, ...] = (768, 320, 640, 1280)
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str = "linear"
    weight_init: Literal["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"] = "Normal"
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: tuple[float, ...] | None = None
    # LoRAs: kohya's sd-scripts (train_network.py with networks.lora) by its option names
    network_dim: int = Field(8, ge=1, le=1024, description="the LoRA's rank")
    network_alpha: float = Field(1.0, gt=0, description="scales the update by alpha / dim")
    network_target: Literal["attention", "transformer"] = Field(
        "transformer", description="the UNet's attention projections only, or every linear layer of its "
                                   "transformer blocks (kohya's default, with proj_in/proj_out)")
    train_text_encoder: bool = True
    unet_lr: float | None = Field(None, gt=0, description="default: learn_rate")
    text_encoder_lr: float | None = Field(None, gt=0, description="default: learn_rate")
    optimizer_type: Literal["AdamW", "SGD", "Adafactor"] = "AdamW"
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    enable_bucket: bool = Field(False, description="resolution buckets by aspect ratio around training_width x "
                                                   "training_height (kohya's bucketing)")
    min_bucket_reso: int = Field(256, ge=64)
    max_bucket_reso: int = Field(1024, ge=64)
    bucket_reso_steps: int = Field(64, ge=8)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value) or value.endswith("."):
            raise ValueError("letters, digits, space, '_', '.', '-'; 1 to 100 characters, starting with a letter "
                             "or digit")
        return value

    @model_validator(mode="after")
    def _schedule_readable(self) -> TrainSpec:
        parse_learn_rate(self.learn_rate, self.steps)
        return self

    @property
    def learn_rate_schedule(self) -> list[tuple[float, int]]:
        return parse_learn_rate(self.learn_rate, self.steps)

    @property
    def image_count(self) -> int:
        return 1

    @property
    def batch_key(self) -> None:
        """Trainings are never batched."""
        return None

    @property
    def output_file(self) -> str:
        """Where the result is installed, relative to the models folder (the WebUI's folders)."""
        if self.kind == "embedding":
            return f"embeddings/{self.name}.safetensors"
        if self.kind == "lora":
            return f"Lora/{self.name}.safetensors"
        return f"hypernetworks/{self.name}.pt"

    @classmethod
    def from_stored(cls, params: dict[str, Any]) -> TrainSpec:
        return cls.model_validate(params)

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
