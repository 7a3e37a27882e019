"""A training request checked and resolved into the training contract, then submitted as a job (issue 15).

Everything is checked before anything is stored: the kind, the output's name (and whether a file already has it),
the caller's dataset, the base checkpoint (SD1.x: the text encoder width embeddings and hypernetworks are made
for), sizes, the learning-rate schedule, the template, the hypernetwork's structure. A bad field is a 422 naming it.
The job goes to the `train` queue, never batched, with the dataset's images as they are now.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from api.submission.inputs import StagedInputs
from api.submission.submit import Prepared, Submitted, check_webhook, persist
from shared.db.models import ApiKey, Dataset
from shared.errors import FieldError
from shared.jobs.training_schemas import LORA_ONLY, ONLY, TrainingRequest
from shared.jobs.training_spec import (
    DEFAULT_TEMPLATE,
    NAME_PATTERN,
    TEMPLATES,
    DatasetItem,
    TrainSpec,
    parse_learn_rate,
)
from shared.models.architecture import checkpoint_architecture
from shared.models.registry import CheckpointFile, default_checkpoint, resolve_checkpoint
from shared.models.safetensors_header import safetensors_header_or_none
from shared.models.store_registry import registered
from shared.queueing.queues import QueueName
from shared.settings import Settings
from shared.storage.base import ObjectStore
from shared.webui.hashes import HashCache

SD1_ARCHITECTURES = ("sd15", "demo-tiny")  # shared/models/architecture.py's SD1.x families
# The WebUI's defaults (embedding, hypernetwork) and kohya's usual LoRA rate.
DEFAULT_LEARN_RATE = {"embedding": "0.005", "hypernetwork": "0.00001", "lora": "0.0001"}
# The WebUI's hypernetwork sizes (its "Modules" checkboxes) and activation names (its dropdown: "linear" is none).
HYPERNETWORK_SIZES = (768, 1024, 320, 640, 1280)
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "celu", "gelu", "glu",
               "hardshrink", "hardsigmoid", "hardtanh", "logsigmoid", "mish", "prelu", "rrelu", "relu6", "selu",
               "silu", "softplus", "softshrink", "softsign", "tanhshrink")


def _field(name: str) -> tuple[str, ...]:
    return ("body", name)


@dataclass(frozen=True)
class TrainingPlan:
    """A fully checked training: its contract and base checkpoint."""

    spec: TrainSpec
    checkpoint: CheckpointFile


def parse_floats(value: str | list[float], name: str) -> tuple[float, ...]:
    """'1, 2, 1' or [1, 2, 1] as numbers; a 422 naming ``name`` otherwise."""
    try:
        numbers = [float(part) for part in value.split(",")] if isinstance(value, str) else [float(v) for v in value]
    except ValueError as exc:
        raise FieldError(_field(name), f"{value!r}: numbers separated by commas, such as '1, 2, 1'") from exc
    return tuple(numbers)


def output_exists(models_dir: Path, spec_file: str) -> bool:
    """Whether the models folder or the model store already has a file where the training would install."""
    folder, name = spec_file.split("/", 1)
    return (models_dir / spec_file).exists() or name in registered(models_dir, folder)


def _hypernetwork_options(body: TrainingRequest) -> dict[str, object]:
    structure = parse_floats(body.layer_structure, "layer_structure")
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or any(v <= 0 or v > 64 for v in structure):
        raise FieldError(_field("layer_structure"), "starts and ends with 1, each value in (0, 64], such as "
                                                    "'1, 2, 1' (the WebUI's rule)")
    sizes = sorted(set(body.enable_sizes))
    if any(not 8 <= size <= 4096 for size in sizes):
        raise FieldError(_field("enable_sizes"), f"context widths between 8 and 4096: the WebUI's "
                                                 f"{', '.join(map(str, HYPERNETWORK_SIZES))} for SD1.x (a size the "
                                                 "checkpoint's attention does not use is skipped)")
    activation = body.activation_func.lower()
    if activation not in ACTIVATIONS:
        raise FieldError(_field("activation_func"), f"one of {', '.join(ACTIVATIONS)}")
    dropout = None
    if body.dropout_structure is not None:
        dropout = parse_floats(body.dropout_structure, "dropout_structure")
        if (len(dropout) != len(structure) or dropout[0] != 0 or dropout[-1] != 0
                or any(not 0 <= v < 1 for v in dropout)):
            raise FieldError(_field("dropout_structure"), "one value per layer_structure entry, each in [0, 1), "
                                                          "the first and the last 0 (the WebUI's rule)")
    return dict(enable_sizes=tuple(sizes), layer_structure=structure, activation_func=activation,
                weight_init=body.weight_init, add_layer_norm=body.add_layer_norm, use_dropout=body.use_dropout,
                dropout_structure=dropout)


def _dataset(session: Session, dataset_id: uuid.UUID | None, owner: str, batch_size: int, steps: int
             ) -> Dataset | None:
    if dataset_id is None:
        if steps > 0:
            raise FieldError(_field("dataset"), "a training needs a dataset (POST /v1/datasets); only steps 0, "
                                                "which creates the file, goes without")
        return None
    row = session.get(Dataset, dataset_id)
    if row is None or row.owner != owner:
        raise FieldError(_field("dataset"), f"no dataset {dataset_id} of yours; upload one with POST /v1/datasets")
    if row.image_count < batch_size:
        raise FieldError(_field("batch_size"), f"batch_size {batch_size} is more than the dataset's "
                                               f"{row.image_count} images")
    return row


def _check_lora(body: TrainingRequest) -> None:
    """kohya's own refusals, made at submit."""
    if body.lr_scheduler == "constant" and body.lr_warmup_steps > 0:
        raise FieldError(_field("lr_warmup_steps"), "the constant scheduler has no warm-up (kohya refuses it); use "
                                                    "constant_with_warmup, or 0")
    if body.min_bucket_reso > body.max_bucket_reso:
        raise FieldError(_field("min_bucket_reso"), f"at most max_bucket_reso ({body.max_bucket_reso})")
    if body.enable_bucket and body.max_bucket_reso < max(body.training_width, body.training_height):
        raise FieldError(_field("max_bucket_reso"), "at least the training size "
                                                    f"({max(body.training_width, body.training_height)})")


def attention_widths(checkpoint: CheckpointFile) -> set[int] | None:
    """The context widths of the checkpoint's UNet attention layers (its `to_k` weights' inputs: the text
    encoder's for cross-attention, the block's channels for self-attention), from the file's header; None when the
    file is not on this machine as a single .safetensors (the worker then checks)."""
    if checkpoint.is_folder or not checkpoint.path.is_file():
        return None
    header = safetensors_header_or_none(checkpoint.path)
    if header is None:
        return None
    widths = {shape[1] for key, shape in header.shapes.items()
              if key.startswith("model.diffusion_model.") and key.endswith(".to_k.weight") and len(shape) == 2}
    return widths or None


def _check_sizes(sizes: tuple[int, ...], checkpoint: CheckpointFile) -> None:
    widths = attention_widths(checkpoint)
    if widths is not None and not widths & set(sizes):
        raise FieldError(_field("enable_sizes"), f"none of {list(sizes)} is a context width of {checkpoint.name}'s "
                                                 f"attention layers ({', '.join(map(str, sorted(widths)))})")


def _start_from(body: TrainingRequest, models_dir: Path) -> str | None:
    """The existing file a training goes on from, relative to the models folder (a 422 naming `start_from`)."""
    if body.start_from is None:
        return None
    name = body.start_from.strip()
    if not NAME_PATTERN.match(name) or name.endswith("."):
        raise FieldError(_field("start_from"), "the name of an embedding, hypernetwork or LoRA in the models folder")
    relpath = {"embedding": f"embeddings/{name}.safetensors", "hypernetwork": f"hypernetworks/{name}.pt",
               "lora": f"Lora/{name}.safetensors"}[body.kind]
    if not output_exists(models_dir, relpath):
        raise FieldError(_field("start_from"), f"no {relpath} (embeddings are read as .safetensors only)")
    return relpath


def _checkpoint(body: TrainingRequest, settings: Settings) -> CheckpointFile:
    models_dir = settings.models.models_dir
    requested = body.model or default_checkpoint(models_dir, settings.models.default_model)
    if requested is None:
        raise FieldError(_field("model"), "no checkpoint is installed; put a .safetensors file in Stable-diffusion/")
    checkpoint = resolve_checkpoint(models_dir, requested)
    architecture = checkpoint_architecture(checkpoint.path)
    if architecture is not None and architecture not in SD1_ARCHITECTURES:
        raise FieldError(_field("model"), f"{checkpoint.name} is {architecture}; trainings take an SD1.x checkpoint "
                                          "(embeddings and hypernetworks are made for its 768-wide text encoder)")
    return checkpoint


def plan_training(session: Session, key: ApiKey, body: TrainingRequest, settings: Settings) -> TrainingPlan:
    """Check everything and build the contract; raises FieldError (nothing stored)."""
    limits = settings.training
    name = body.name.strip()
    if not NAME_PATTERN.match(name) or name.endswith("."):
        raise FieldError(_field("name"), "letters, digits, space, '_', '.', '-'; 1 to 100 characters, starting "
                                         "with a letter or digit (it names a file in the models folder)")
    unused = [(name, kind) for kind, names in ONLY.items() if kind != body.kind for name in names
              if name in body.model_fields_set]
    if unused:
        name, kind = unused[0]
        raise FieldError(_field(name), f"{name} applies to {kind} trainings only")
    learn_rate = (body.learn_rate or DEFAULT_LEARN_RATE[body.kind]).strip()
    if body.kind == "lora":
        _check_lora(body)
    if body.steps > limits.training_max_steps:
        raise FieldError(_field("steps"), f"at most {limits.training_max_steps} (RENDERFARM_TRAINING_MAX_STEPS)")
    for side in ("training_width", "training_height"):
        if getattr(body, side) > limits.training_max_side:
            raise FieldError(_field(side), f"at most {limits.training_max_side} (RENDERFARM_TRAINING_MAX_SIDE)")
    try:
        parse_learn_rate(learn_rate, body.steps)
    except ValueError as exc:
        raise FieldError(_field("learn_rate"), str(exc)) from exc
    if body.template is not None and body.template_filename is not None:
        raise FieldError(_field("template"), "give template or template_filename, not both")
    template_name = body.template_filename or (None if body.template else DEFAULT_TEMPLATE[body.kind])
    if template_name is not None and template_name not in TEMPLATES:
        raise FieldError(_field("template_filename"), f"one of {', '.join(TEMPLATES)}")
    template = tuple(body.template) if body.template else TEMPLATES[template_name or ""]
    options = _hypernetwork_options(body) if body.kind == "hypernetwork" else {}
    if body.kind == "embedding" and not body.init_text.strip():
        options["init_text"] = "*"
    dataset = _dataset(session, body.dataset, key.owner, body.batch_size, body.steps)
    start_from = _start_from(body, settings.models.models_dir)
    checkpoint = _checkpoint(body, settings)
    if body.kind == "hypernetwork" and start_from is None:
        _check_sizes(tuple(options["enable_sizes"]), checkpoint)  # type: ignore[arg-type]
    cache = HashCache.of_models_dir(settings.models.models_dir)
    spec = TrainSpec(
        kind=body.kind, name=name, model=checkpoint.name,
        model_hash=cache.checkpoint(checkpoint.path),
        dataset=str(dataset.id) if dataset is not None else None, start_from=start_from,
        items=tuple(DatasetItem(key=item["key"], caption=item.get("caption") or "")
                    for item in (dataset.items if dataset is not None else ())),
        steps=body.steps, seed=body.seed if body.seed >= 0 else random.randrange(2**32),
        learn_rate=learn_rate, batch_size=body.batch_size, gradient_step=body.gradient_step,
        clip_grad_mode=body.clip_grad_mode, clip_grad_value=body.clip_grad_value,
        training_width=body.training_width, training_height=body.training_height, template=template,
        template_filename=template_name, shuffle_tags=body.shuffle_tags, tag_drop_out=body.tag_drop_out,
        save_every=body.save_every, create_image_every=body.create_image_every,
        preview_prompt=body.preview_prompt, preview_steps=body.preview_steps,
        preview_cfg_scale=body.preview_cfg_scale, overwrite_old=body.overwrite_old,
        init_text=str(options.pop("init_text", body.init_text)), nvpt=body.nvpt, **options,
        **({name: getattr(body, name) for name in LORA_ONLY} if body.kind == "lora" else {}),
    )
    if not spec.overwrite_old and output_exists(settings.models.models_dir, spec.output_file):
        raise FieldError(_field("name"), f"{spec.output_file} already exists; choose another name, or set "
                                         "overwrite_old to replace it")
    return TrainingPlan(spec, checkpoint)


def submit_training(session: Session, key: ApiKey, body: TrainingRequest, settings: Settings, store: ObjectStore,
                    *, idempotency_key: str | None = None) -> Submitted:
    """Create and enqueue a training on the `train` queue (the same transaction and Idempotency-Key rules as a
    render job); raises FieldError with nothing stored on bad input."""
    plan = plan_training(session, key, body, settings)
    prepared = Prepared(body, plan, plan.spec.to_stored(), plan.checkpoint.name, QueueName.TRAIN, StagedInputs(),
                        check_webhook(body))
    return persist(session, key, prepared, store, settings.jobs.max_attempts, idempotency_key)
