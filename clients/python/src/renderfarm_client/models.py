"""What the farm answers, as small frozen dataclasses; each keeps the whole answer in ``raw``.

Only the fields a client acts on are typed; anything the farm adds later is still in ``raw``, so an
older client never fails on a newer farm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from renderfarm_client.errors import JobFailed

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class JobImage:
    index: int
    url: str
    seed: int
    width: int
    height: int
    infotext: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobImage:
        return cls(index=int(data["index"]), url=str(data["url"]), seed=int(data["seed"]),
                   width=int(data.get("width", 0)), height=int(data.get("height", 0)),
                   infotext=str(data.get("infotext", "")))


@dataclass(frozen=True)
class JobError:
    type: str
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    progress: float
    current_step: int
    total_steps: int
    eta_seconds: float | None
    queue_position: int | None
    model: str
    seeds: list[int]
    images: list[JobImage]
    error: JobError | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        error = data.get("error")
        return cls(
            id=str(data["id"]), status=str(data["status"]), progress=float(data.get("progress") or 0.0),
            current_step=int(data.get("current_step") or 0), total_steps=int(data.get("total_steps") or 0),
            eta_seconds=data.get("eta_seconds"), queue_position=data.get("queue_position"),
            model=str(data.get("model", "")), seeds=[int(s) for s in data.get("seeds") or []],
            images=[JobImage.from_json(i) for i in data.get("images") or []],
            error=JobError(str(error.get("type", "")), str(error.get("message", ""))) if error else None,
            raw=data,
        )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def params(self) -> dict[str, Any]:
        """The job's parameters as the farm resolved them (random seed picked, defaults filled)."""
        params = self.raw.get("params")
        return params if isinstance(params, dict) else {}

    def raise_for_status(self) -> Job:
        """The job itself when it succeeded or is still going; JobFailed when it failed or was canceled."""
        if self.status in ("failed", "canceled"):
            raise JobFailed(self)
        return self


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    total: int
    limit: int
    offset: int


@dataclass(frozen=True)
class Model:
    name: str
    title: str
    hash: str | None
    default: bool
    loadable: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(name=str(data["name"]), title=str(data.get("title", data["name"])), hash=data.get("hash"),
                   default=bool(data.get("default")), loadable=bool(data.get("loadable", True)), raw=data)


@dataclass(frozen=True)
class ModelFile:
    """A LoRA (or VAE, embedding) file as the farm lists it."""

    name: str
    file: str
    hash: str | None
    refused_reason: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFile:
        return cls(name=str(data["name"]), file=str(data.get("file", "")), hash=data.get("hash"),
                   refused_reason=data.get("refused_reason"), raw=data)


@dataclass(frozen=True)
class StoredModel:
    """A file in the farm's shared model store (``POST /v1/models``): every worker pulls it when a job needs it."""

    id: int
    kind: str
    name: str
    file: str  # its path inside a models folder: "Lora/ink.safetensors"
    sha256: str
    size: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredModel:
        return cls(id=int(data["id"]), kind=str(data["kind"]), name=str(data["name"]), file=str(data["file"]),
                   sha256=str(data["sha256"]), size=int(data["size"]), raw=data)


@dataclass(frozen=True)
class Upload:
    """An uploaded input image; put ``ref`` (``upload:<id>``) in ``init_images`` or ``mask``."""

    id: str
    ref: str
    width: int
    height: int


@dataclass(frozen=True)
class BuiltPrompt:
    """``POST /v1/prompts/build``: the prompt the dictionary made, and the choices with random picks resolved."""

    prompt: str
    negative_prompt: str
    choices: dict[str, Any]
    seed: int | None
    settings: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, compare=False)
    warnings: list[str] = field(default_factory=list)  # e.g. more props than the notes say survive

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuiltPrompt:
        return cls(prompt=str(data.get("prompt", "")), negative_prompt=str(data.get("negative_prompt", "")),
                   choices=dict(data.get("choices") or {}), seed=data.get("seed"),
                   settings=dict(data.get("settings") or {}), raw=data,
                   warnings=[str(w) for w in data.get("warnings") or []])
