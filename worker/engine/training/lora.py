"""LoRA training as kohya's sd-scripts do it (``train_network.py`` with ``--network_module networks.lora``).

Which layers (kohya's ``LoRANetwork.create_modules``): with ``network_target`` "transformer" (kohya's default)
every Linear and every 1x1 Conv2d inside the UNet's transformer blocks (``Transformer2DModel``: ``proj_in``,
the attention projections, the feed-forward layers, ``proj_out``); with "attention" only the attention
projections ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of ``attn1`` and ``attn2``. With
``train_text_encoder`` also the text encoder's self-attention ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` and
its MLP's ``fc1`` and ``fc2`` (kohya's ``CLIPAttention`` and ``CLIPMLP``). Each such layer gets a module of two
factors, ``lora_down`` (in -> rank; kaiming-uniform with a = sqrt(5), as kohya's and Microsoft's) and ``lora_up``
(rank -> out; zeros, so training starts from the unchanged model), 1x1 convolutions for a convolution, and adds
``lora_up(lora_down(x)) * multiplier * alpha / rank`` to the layer's output (multiplier 1). The initial draws come
from the training's seed.

The pipeline is a warm, shared one: its layers are neither replaced nor changed. The modules enter through
forward hooks on them, for :meth:`LoraTrainee.applied` only, removed afterwards. A layer that is not a plain torch
Linear or Conv2d is refused, except a peft LoRA layer of a render's adapters while they are switched off (what
the runner does before a training): then the hook goes on its base layer, whose output is what that layer
returns. An adapter still active (or merged into the weights) is refused: the training would learn on top of it.

Optimizers (kohya's ``optimizer_type``): AdamW (torch's, weight decay 0.01 as kohya's default), SGD (torch's,
plain) or Adafactor (``transformers.optimization.Adafactor`` with an explicit rate: ``scale_parameter``,
``relative_step`` and ``warmup_init`` off, the settings kohya's documentation gives for LoRAs), with two parameter
groups: the UNet's modules at ``unet_lr`` and the text encoder's at ``text_encoder_lr`` (each defaulting to the
step's ``learn_rate``), both times the ``lr_scheduler`` multiplier of the step (diffusers' schedules, which
kohya uses: the warm-up ramps from 0 at step 0; linear and cosine decay to 0 at the last step).

The output is kohya's LoRA file: a ``.safetensors`` of ``lora_unet_<module path, '.' as '_'>.lora_down.weight``,
``.lora_up.weight`` and ``.alpha`` (and ``lora_te_...`` for the text encoder) in float16, with the ``ss_*``
metadata kohya's ``train_network.py`` writes and the WebUI's Lora panel reads, and ``sshs_model_hash`` /
``sshs_legacy_hash`` computed as kohya's ``precalculate_safetensors_hashes`` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors.torch import save

from shared.jobs.training_spec import TrainSpec, rate_at
from worker.engine.conditioning import PromptEncoder
from worker.engine.training import seeding
from worker.engine.training.embedding import encode_with_grad

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
SAVE_DTYPE = torch.float16  # kohya's --save_precision fp16
STARTED = "training_started_at"  # a checkpoint's extra tensor: the first attempt's start, for the metadata
# A kohya name of an attention projection (what "attention" trains), in the UNet.
ATTENTION_NAME = re.compile(r"_attn[12]_(to_q|to_k|to_v|to_out_0)$")
Layer = torch.nn.Linear | torch.nn.Conv2d


def is_peft_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def plain_layer(path: str, module: torch.nn.Module) -> Layer:
    """The torch layer at ``path`` a LoRA module can wrap: the module itself, or a switched-off peft layer's base
    layer. Raises ValueError naming the layer otherwise."""
    layer: Any = module
    if is_peft_layer(layer):
        if bool(getattr(layer, "merged", False)) or not bool(getattr(layer, "disable_adapters", False)):
            raise ValueError(f"{path}: a LoRA adapter of a render is active (or merged) on this layer; switch the "
                             "pipeline's LoRAs off before training")
        layer = layer.get_base_layer()
    if type(layer) not in (torch.nn.Linear, torch.nn.Conv2d):
        raise ValueError(f"{path} is a {type(layer).__module__}.{type(layer).__qualname__}, not a plain torch "
                         "Linear or Conv2d: a LoRA cannot be trained on it")
    return layer


def _layers(module: torch.nn.Module, path: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every Linear or Conv2d (or peft layer) below ``module``, in module order; not into those."""
    for name, child in module.named_children():
        child_path = f"{path}.{name}"
        if is_peft_layer(child) or isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
            yield child_path, child
        else:
            yield from _layers(child, child_path)


def _is_transformer(module: torch.nn.Module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")  # Transformer2DModel


def unet_targets(unet: torch.nn.Module, target: str) -> list[tuple[str, Layer]]:
    """The UNet's layers a LoRA of ``network_target`` ``target`` trains, by their module paths."""
    found: list[tuple[str, Layer]] = []
    for block_path, block in unet.named_modules():
        if not _is_transformer(block):
            continue
        attentions = [f"{block_path}.{name}" for name, module in block.named_modules()
                      if name.rsplit(".", 1)[-1] in ("attn1", "attn2") and hasattr(module, "to_q")]
        required = [f"{path}.{projection}" for path in attentions for projection in ATTENTION_PROJECTIONS]
        if target == "attention":
            candidates = [(path, unet.get_submodule(path)) for path in required]
        else:
            for path in (*required, f"{block_path}.proj_in", f"{block_path}.proj_out"):
                plain_layer(path, unet.get_submodule(path))  # these at least must be plain layers
            candidates = list(_layers(block, block_path))
        for path, module in candidates:
            layer = plain_layer(path, module)
            if isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) != (1, 1):
                continue  # kohya's default trains no 3x3 convolution
            found.append((path, layer))
    if not found:
        raise ValueError("this UNet has no transformer blocks to train a LoRA on")
    return found


def text_encoder_targets(text_encoder: torch.nn.Module) -> list[tuple[str, Layer]]:
    """The text encoder's self-attention projections and MLP layers, by their ``CLIPTextModel`` paths."""
    found: list[tuple[str, Layer]] = []
    for path, module in text_encoder.named_modules():
        names: tuple[str, ...]
        if all(hasattr(module, name) for name in TEXT_ATTENTION):
            names = TEXT_ATTENTION
        elif all(hasattr(module, name) for name in TEXT_MLP):
            names = TEXT_MLP
        else:
            continue
        for name in names:
            full = f"{path}.{name}"
            # Published files name CLIP's layers from CLIPTextModel ("text_model.encoder..."), as kohya does.
            found.append((full if full.startswith("text_model.") else f"text_model.{full}",
                          plain_layer(full, getattr(module, name))))
    return found


def lora_name(prefix: str, path: str) -> str:
    """kohya's module name: ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{path.replace('.', '_')}"


class LoRAModule(torch.nn.Module):
    """kohya's ``LoRAModule``: ``lora_down``, ``lora_up`` and the ``alpha`` buffer, for one layer."""

    def __init__(self, layer: Layer, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_down: Layer
        self.lora_up: Layer
        if isinstance(layer, torch.nn.Conv2d):
            kernel: Any = layer.kernel_size
            stride: Any = layer.stride
            padding: Any = layer.padding
            self.lora_down = torch.nn.Conv2d(layer.in_channels, rank, kernel, stride, padding, bias=False)
            self.lora_up = torch.nn.Conv2d(rank, layer.out_channels, (1, 1), (1, 1), bias=False)
        else:
            self.lora_down = torch.nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = torch.nn.Linear(rank, layer.out_features, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = float(alpha) / rank
        self.multiplier = 1.0
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """A forward hook on the wrapped layer: its output plus this module's."""
        x = args[0]
        return output + self(x.to(self.lora_down.weight.dtype)).to(output.dtype)


def lr_multiplier(scheduler: str, step: int, warmup: int, total: int) -> float:
    """The ``lr_scheduler``'s factor at ``step`` (0-based) of ``total``, as diffusers' ``get_scheduler`` (which
    kohya uses) computes it; a pure function of the step, so a resumed run gets the same rates."""
    if scheduler == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if scheduler == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ValueError(f"unknown lr_scheduler {scheduler!r}")


def _adafactor() -> Any:
    try:
        from transformers.optimization import Adafactor
    except ImportError as exc:
        raise ValueError("optimizer_type Adafactor needs transformers.optimization.Adafactor, and the transformers "
                         "package is not installed on this worker; choose AdamW or SGD") from exc
    return Adafactor


ADAFACTOR_ARGS: dict[str, Any] = {"scale_parameter": False, "relative_step": False, "warmup_init": False}


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """kohya's ``set_tag_frequency``: each comma-separated tag of every caption, stripped and lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``precalculate_safetensors_hashes``: the SHA-256 of the tensor data of the file saved with only the
    ``ss_`` metadata, and the legacy hash (8 hex digits of the 64 KiB at 1 MiB of that file)."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    stream = io.BytesIO(data)
    stream.seek(0x100000)
    legacy = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
    return hashlib.sha256(data[8 + header :]).hexdigest(), legacy


class LoraTrainee:
    """The LoRA modules being trained, hooked onto the UNet's (and the text encoder's) layers."""

    def __init__(self, pipeline: Any, spec: TrainSpec) -> None:
        if spec.lr_scheduler == "constant" and spec.lr_warmup_steps:
            raise ValueError("lr_scheduler constant takes no lr_warmup_steps (as kohya's); use constant_with_warmup")
        if spec.optimizer_type == "Adafactor":
            _adafactor()  # refused now, not after the dataset is encoded
        self.spec = spec
        self.placeholder = spec.name
        self.started_at = time.time()
        self.unet = pipeline.unet
        rank, alpha = spec.network_dim, float(spec.network_alpha)
        unet = [(lora_name(UNET_PREFIX, path), layer) for path, layer in unet_targets(pipeline.unet,
                                                                                       spec.network_target)]
        text = ([(lora_name(TEXT_ENCODER_PREFIX, path), layer) for path, layer in
                 text_encoder_targets(pipeline.text_encoder)] if spec.train_text_encoder else [])
        self.network = torch.nn.Module()
        self.targets: list[tuple[torch.nn.Module, LoRAModule]] = []
        with torch.random.fork_rng(devices=[]):  # the factors' initialisation draws from the global RNG
            torch.default_generator.manual_seed(seeding.derived_seed(spec.seed, seeding.INIT))
            for name, layer in text + unet:  # kohya's order: the text encoder's modules first
                if hasattr(self.network, name):
                    raise ValueError(f"two layers give the LoRA name {name}")
                module = LoRAModule(layer, rank, alpha)
                self.network.add_module(name, module)
                self.targets.append((layer, module))
        self.network.to(self.unet.device, torch.float32)
        self.unet_names = [name for name, _ in unet]
        self.text_names = [name for name, _ in text]
        self.set_training(False)
        self.encoder = PromptEncoder(pipeline.tokenizer, pipeline.text_encoder)
        self.mixed_precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.unet.dtype, "no")
        self.captions: list[str] = []
        self.bucket_info: dict[str, Any] | None = None

    # -- what the loop needs ------------------------------------------------------------------------------------

    def _group(self, names: list[str]) -> list[torch.Tensor]:
        return [p for name in names for p in self.network.get_submodule(name).parameters()]

    def parameters(self) -> list[torch.Tensor]:
        return self._group(self.unet_names) + self._group(self.text_names)

    def make_optimizer(self) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = [{"params": self._group(self.unet_names)}]
        if self.text_names:
            groups.append({"params": self._group(self.text_names)})
        if self.spec.optimizer_type == "SGD":
            return torch.optim.SGD(groups, lr=1.0)  # the rates are set every step
        if self.spec.optimizer_type == "Adafactor":
            return _adafactor()(groups, lr=1.0, **ADAFACTOR_ARGS)
        return torch.optim.AdamW(groups, lr=1.0)

    def optimizer_name(self) -> str:
        """``ss_optimizer`` as kohya writes it: the class's module and name, then its arguments."""
        if self.spec.optimizer_type == "SGD":
            return f"{torch.optim.SGD.__module__}.SGD"
        if self.spec.optimizer_type == "Adafactor":
            args = ",".join(f"{k}={v}" for k, v in ADAFACTOR_ARGS.items())
            return f"transformers.optimization.Adafactor({args})"
        return f"{torch.optim.AdamW.__module__}.AdamW"

    def base_rates(self, rate: float) -> tuple[float, float]:
        """The UNet's and the text encoder's rates before the scheduler: their own, else the step's."""
        return (self.spec.unet_lr or rate, self.spec.text_encoder_lr or rate)

    def learning_rates(self, step: int, rate: float) -> list[float]:
        """Each parameter group's rate at ``step``: the UNet's, then the text encoder's (when trained)."""
        factor = lr_multiplier(self.spec.lr_scheduler, step, self.spec.lr_warmup_steps, self.spec.steps)
        unet, text = self.base_rates(rate)
        return [unet * factor, text * factor] if self.text_names else [unet * factor]

    def observe(self, data: Any) -> None:
        """The dataset's captions and buckets, for the metadata."""
        self.captions = list(data.captions)
        bucket_info = getattr(data, "bucket_info", None)
        self.bucket_info = bucket_info() if callable(bucket_info) else None

    def weights(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{part}.weight": getattr(self.network.get_submodule(name), part).weight
                for name in self.text_names + self.unet_names for part in ("lora_down", "lora_up")}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.weights(), STARTED: torch.tensor(self.started_at, dtype=torch.float64)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        mine = self.weights()
        given = {key: value for key, value in tensors.items() if key != STARTED}
        missing, extra = sorted(set(mine) - set(given)), sorted(set(given) - set(mine))
        if missing or extra:
            raise ValueError(f"the tensors do not fit this LoRA on this model: {len(missing)} of its modules' "
                             f"missing ({', '.join(missing[:3])}), {len(extra)} unknown ({', '.join(extra[:3])})")
        wrong = [key for key in mine if tuple(given[key].shape) != tuple(mine[key].shape)]
        if wrong:
            raise ValueError(f"the tensors do not fit this LoRA: {wrong[0]} is {list(given[wrong[0]].shape)}, this "
                             f"LoRA's {list(mine[wrong[0]].shape)} (network_dim {self.spec.network_dim})")
        with torch.no_grad():
            for key, value in mine.items():
                value.copy_(given[key])
        if STARTED in tensors:
            self.started_at = float(tensors[STARTED])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        handles = []
        try:
            for layer, module in self.targets:
                handles.append(layer.register_forward_hook(module.hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_training(self, on: bool) -> None:
        self.network.train(on)

    def conditioning(self, prompts: list[str]) -> torch.Tensor:
        if self.text_names:
            return encode_with_grad(self.encoder, prompts)
        return self.encoder.encode(prompts)

    # -- the file ---------------------------------------------------------------------------------------------

    def session_id(self) -> int:
        """kohya's ``ss_session_id`` (a random 32-bit number there): here one derived from the whole request, so
        that an attempt resumed from a checkpoint writes the same."""
        digest = hashlib.sha256(json.dumps(self.spec.to_stored(), sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:4], "little")

    def metadata(self, step: int) -> dict[str, str]:
        spec = self.spec
        first = rate_at(spec.learn_rate_schedule, 0)
        unet_lr, text_lr = self.base_rates(first)
        dataset = spec.dataset or spec.name
        micro_batches = max(1, spec.gradient_step)
        values: dict[str, Any] = {
            "ss_session_id": self.session_id(),
            "ss_training_started_at": self.started_at,
            "ss_output_name": spec.name,
            "ss_learning_rate": first,
            "ss_text_encoder_lr": text_lr if self.text_names else None,
            "ss_unet_lr": unet_lr,
            "ss_num_train_images": len(self.captions),
            "ss_num_reg_images": 0,
            "ss_gradient_accumulation_steps": micro_batches,
            "ss_max_train_steps": spec.steps,
            "ss_lr_warmup_steps": spec.lr_warmup_steps,
            "ss_lr_scheduler": spec.lr_scheduler,
            "ss_network_module": "networks.lora",
            "ss_network_dim": spec.network_dim,
            "ss_network_alpha": float(spec.network_alpha),
            "ss_network_dropout": None,
            "ss_mixed_precision": self.mixed_precision,
            "ss_full_fp16": False,
            "ss_v2": False,
            "ss_base_model_version": "sd_v1",
            "ss_clip_skip": None,
            "ss_max_token_length": None,
            "ss_cache_latents": True,
            "ss_seed": spec.seed,
            "ss_noise_offset": None,
            "ss_optimizer": self.optimizer_name(),
            "ss_max_grad_norm": spec.clip_grad_value if spec.clip_grad_mode == "norm" else 0.0,
            "ss_caption_tag_dropout_rate": spec.tag_drop_out,
            "ss_prior_loss_weight": 1.0,
            "ss_batch_size_per_device": spec.batch_size,
            "ss_total_batch_size": spec.batch_size * micro_batches,
            "ss_resolution": (spec.training_width, spec.training_height),
            "ss_color_aug": False,
            "ss_flip_aug": False,
            "ss_random_crop": False,
            "ss_shuffle_caption": spec.shuffle_tags,
            "ss_enable_bucket": spec.enable_bucket,
            "ss_bucket_no_upscale": False,
            "ss_min_bucket_reso": spec.min_bucket_reso if spec.enable_bucket else None,
            "ss_max_bucket_reso": spec.max_bucket_reso if spec.enable_bucket else None,
            "ss_keep_tokens": 0,
            "ss_dataset_dirs": json.dumps({dataset: {"n_repeats": 1, "img_count": len(self.captions)}}),
            "ss_reg_dataset_dirs": json.dumps({}),
            "ss_tag_frequency": json.dumps({dataset: tag_frequency(self.captions)}),
            "ss_bucket_info": json.dumps(self.bucket_info),
            "ss_sd_model_name": spec.model,
            "ss_training_finished_at": time.time(),
            "ss_steps": step,
        }
        if spec.model_hash:
            values["ss_sd_model_hash"] = spec.model_hash
        return {key: str(value) for key, value in values.items()}

    def output(self, step: int) -> bytes:
        tensors = {key: value.detach().to("cpu", SAVE_DTYPE).contiguous()
                   for key, value in self.network.state_dict().items()}
        metadata = self.metadata(step)
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
        return save(tensors, metadata)
