"""Training LoRAs on the tiny demo model at 64x64 (issue 15, worker.engine.training.lora): kohya's networks.lora.

One LoRA is trained once (a module fixture: UNet transformer blocks and text encoder, cosine schedule with
warm-up, two rates, checkpoints); the tests check that it lowers the probe loss, that a run resumed from a
checkpoint repeats it exactly, that the file has kohya's keys and metadata and passes the model store's checks,
that it loads through the farm's own LoRA path (LoraCache, the engine's render) and acts there exactly as in
training, that the warm pipeline is left as it was, and that bucketing puts images of other aspect ratios in
their own buckets, one bucket per micro-batch.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load, save

from devtools.demo_models.sd15 import build_demo_checkpoint
from shared.jobs.contract import RenderSpec
from shared.jobs.training_spec import TrainSpec
from shared.models.store_registry import describe_file
from shared.webui.hashes import addnet_hash, lora_short_hash
from tests.unit.test_training import COMMON, SAMPLES, Run, Snapshot, assert_untouched, run, snapshot
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.conditioning import PromptEncoder
from worker.engine.engine import GenerationEngine
from worker.engine.lora import LoraCache, LoraRequest
from worker.engine.training import StepReport, TrainingSample, train
from worker.engine.training.buckets import BucketedData, bucket_resolutions, select_bucket
from worker.engine.training.data import training_data
from worker.engine.training.lora import STARTED, LoraTrainee, lr_multiplier

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 12 steps at 0.01 (text encoder 0.005), cosine after 2 warm-up steps: the probe loss fell 4-12% on every seed
# tried (5, 6, 7; the UNet's transformer layers act on the random demo model's whole output, unlike an
# embedding), a margin far beyond the probe's noise.
LORA: dict[str, Any] = dict(
    kind="lora", name="shapelora", steps=12, learn_rate="0.01", batch_size=2, gradient_step=2,
    template=("[filewords]",), network_dim=4, network_alpha=2.0, text_encoder_lr=0.005, lr_scheduler="cosine",
    lr_warmup_steps=2, clip_grad_mode="norm", clip_grad_value=1.0, save_every=4)
RESUME_AT = 4
# The layers of each of the demo UNet's 7 transformer blocks (2 down, 1 mid, 4 up) and of its 3 CLIP layers.
TRANSFORMER_LAYERS = ("proj_in", "transformer_blocks_0_attn1_to_q", "transformer_blocks_0_attn1_to_k",
                      "transformer_blocks_0_attn1_to_v", "transformer_blocks_0_attn1_to_out_0",
                      "transformer_blocks_0_attn2_to_q", "transformer_blocks_0_attn2_to_k",
                      "transformer_blocks_0_attn2_to_v", "transformer_blocks_0_attn2_to_out_0",
                      "transformer_blocks_0_ff_net_0_proj", "transformer_blocks_0_ff_net_2", "proj_out")
TEXT_LAYERS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def lora_spec(**overrides: Any) -> TrainSpec:
    return TrainSpec(**{**COMMON, **LORA, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return build_demo_checkpoint(tmp_path_factory.mktemp("training-lora") / "demo.safetensors")


@pytest.fixture(scope="module")
def pipe(checkpoint: Path) -> Any:
    return load_pipeline(checkpoint)


@pytest.fixture(scope="module")
def baseline(pipe: Any) -> Snapshot:
    return snapshot(pipe)


@pytest.fixture(scope="module")
def done(pipe: Any, baseline: Snapshot) -> Run:
    """The LoRA's uninterrupted training (after the baseline snapshot)."""
    return run(pipe, lora_spec())


def transformer_blocks(unet: torch.nn.Module) -> list[str]:
    return [name.replace(".", "_") for name, module in unet.named_modules()
            if hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")]


def file_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file in memory."""
    header = int.from_bytes(data[:8], "little")
    metadata: dict[str, str] = json.loads(data[8 : 8 + header]).get("__metadata__", {})
    return metadata


def unet_input(pipe: Any, prompt: str = "red, circle") -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's conditioning and one UNet evaluation on it (what a render computes at one step)."""
    cond = PromptEncoder(pipe.tokenizer, pipe.text_encoder).encode([prompt])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return cond, pipe.unet(latents, torch.tensor([400]), encoder_hidden_states=cond).sample


# -- training helps, with the requested rates --------------------------------------------------------------------

def test_training_lowers_the_probe_loss_at_the_scheduled_rates(done: Run) -> None:
    spec = lora_spec()
    assert done.result.probe_loss_after < done.result.probe_loss_before
    assert [r.step for r in done.reports] == list(range(1, spec.steps + 1))
    assert [r.loss for r in done.reports] == done.result.losses
    # reported: the UNet's rate, learn_rate times the cosine schedule's factor (0 at step 0, as diffusers' warm-up)
    assert [r.learn_rate for r in done.reports] == [0.01 * lr_multiplier("cosine", s, 2, 12) for s in range(12)]
    assert done.reports[0].learn_rate == 0.0 and done.reports[2].learn_rate == 0.01
    assert sorted(done.checkpoints) == [4, 8]


def test_the_schedulers_are_diffusers_factors() -> None:
    assert [lr_multiplier("constant", s, 0, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [lr_multiplier("constant_with_warmup", s, 4, 10) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert [lr_multiplier("linear", s, 2, 10) for s in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    assert lr_multiplier("cosine", 2, 2, 10) == 1.0 and lr_multiplier("cosine", 10, 2, 10) == 0.0
    assert lr_multiplier("cosine", 6, 2, 10) == pytest.approx(0.5)


def test_each_group_has_its_rate_and_the_optimizer_is_the_requested_one(pipe: Any, baseline: Snapshot,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    trainee = LoraTrainee(pipe, lora_spec(unet_lr=0.002, lr_scheduler="linear"))
    assert trainee.learning_rates(2, 0.01) == [0.002, 0.005]  # unet_lr, text_encoder_lr; learn_rate unused
    assert trainee.learning_rates(7, 0.01) == pytest.approx([0.002 * 0.5, 0.005 * 0.5])
    optimizer = trainee.make_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 2
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainee.parameters())
    unet_only = LoraTrainee(pipe, lora_spec(train_text_encoder=False, optimizer_type="SGD"))
    assert unet_only.learning_rates(5, 0.01) == [0.01 * lr_multiplier("cosine", 5, 2, 12)]
    assert isinstance(unet_only.make_optimizer(), torch.optim.SGD)
    assert unet_only.optimizer_name() == "torch.optim.sgd.SGD"
    for optimizer_type in ("SGD", "Adafactor"):  # both train (two steps) and say what they were
        result = train(pipe, lora_spec(optimizer_type=optimizer_type, steps=2, save_every=0), SAMPLES)
        expected = {"SGD": "torch.optim.sgd.SGD", "Adafactor": "transformers.optimization.Adafactor("}
        assert file_metadata(result.file_bytes)["ss_optimizer"].startswith(expected[optimizer_type])
    monkeypatch.setitem(sys.modules, "transformers.optimization", None)  # as if transformers were missing
    with pytest.raises(ValueError, match="Adafactor"):
        train(pipe, lora_spec(optimizer_type="Adafactor"), SAMPLES)
    with pytest.raises(ValueError, match="constant_with_warmup"):
        train(pipe, lora_spec(lr_scheduler="constant"), SAMPLES)  # kohya refuses warm-up steps there too
    assert_untouched(pipe, baseline)


# -- resume ----------------------------------------------------------------------------------------------------

def test_a_run_resumed_from_a_checkpoint_repeats_the_uninterrupted_run_exactly(pipe: Any, done: Run) -> None:
    data = done.checkpoints[RESUME_AT]
    resumed = run(pipe, lora_spec(), resume=data)
    assert [r.step for r in resumed.reports] == list(range(RESUME_AT + 1, 13))
    # Tolerance: none. On the CPU every step of the resumed run is bit-identical to the uninterrupted one.
    assert resumed.result.losses == done.result.losses
    assert [r.learn_rate for r in resumed.reports] == [r.learn_rate for r in done.reports[RESUME_AT:]]
    assert resumed.result.probe_loss_before == done.result.probe_loss_before
    assert resumed.result.probe_loss_after == done.result.probe_loss_after
    ours, theirs = load(resumed.result.file_bytes), load(done.result.file_bytes)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the metadata too, but for the time it finished: the first attempt's start travels in the checkpoint
    a, b = file_metadata(resumed.result.file_bytes), file_metadata(done.result.file_bytes)
    same = ("ss_training_started_at", "ss_session_id", "sshs_model_hash", "ss_steps", "ss_tag_frequency")
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert state["step"] == RESUME_AT and state["tensors"][STARTED].dtype == torch.float64
    assert resumed.checkpoints.keys() == {8}
    with pytest.raises(ValueError, match="another training"):
        train(pipe, lora_spec(seed=6), SAMPLES, resume=data)


# -- the file -------------------------------------------------------------------------------------------------

def test_the_file_has_kohyas_keys_and_metadata_and_the_model_store_takes_it(pipe: Any, done: Run,
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "shapelora.safetensors"
    path.write_bytes(done.result.file_bytes)
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    tensors = load(done.result.file_bytes)
    modules = {f"lora_unet_{block}_{layer}" for block in transformer_blocks(pipe.unet) for layer in TRANSFORMER_LAYERS}
    modules |= {f"lora_te_text_model_encoder_layers_{i}_{layer}" for i in range(3) for layer in TEXT_LAYERS}
    assert len(transformer_blocks(pipe.unet)) == 7
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert keys == {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert all(float(tensors[f"{m}.alpha"]) == 2.0 for m in modules)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{q}.lora_down.weight"].shape == (4, 32) and tensors[f"{q}.lora_up.weight"].shape == (32, 4)
    proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 convolution on SD1.x: conv factors
    assert tensors[f"{proj_in}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert tensors[f"{proj_in}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert any(bool(tensors[f"{m}.lora_up.weight"].any()) for m in modules)  # trained away from zero
    assert {k: metadata[k] for k in (
        "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_sd_model_name",
        "ss_sd_model_hash", "ss_resolution", "ss_num_train_images", "ss_steps", "ss_max_train_steps",
        "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_optimizer", "ss_lr_scheduler",
        "ss_lr_warmup_steps", "ss_output_name", "ss_enable_bucket", "ss_seed", "ss_clip_skip", "ss_v2",
        "ss_batch_size_per_device", "ss_gradient_accumulation_steps", "ss_mixed_precision")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
        "ss_base_model_version": "sd_v1", "ss_sd_model_name": "demo", "ss_sd_model_hash": "0123456789",
        "ss_resolution": "(64, 64)", "ss_num_train_images": "4", "ss_steps": "12", "ss_max_train_steps": "12",
        "ss_learning_rate": "0.01", "ss_unet_lr": "0.01", "ss_text_encoder_lr": "0.005",
        "ss_optimizer": "torch.optim.adamw.AdamW", "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "2",
        "ss_output_name": "shapelora", "ss_enable_bucket": "False", "ss_seed": "5", "ss_clip_skip": "None",
        "ss_v2": "False", "ss_batch_size_per_device": "2", "ss_gradient_accumulation_steps": "2",
        "ss_mixed_precision": "no"}
    assert json.loads(metadata["ss_tag_frequency"]) == {"shapes": {"red": 1, "circle": 2, "blue": 1, "square": 2,
                                                                   "green": 1, "yellow": 1}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"shapes": {"n_repeats": 1, "img_count": 4}}
    assert float(metadata["ss_training_started_at"]) <= float(metadata["ss_training_finished_at"])
    assert 0 <= int(metadata["ss_session_id"]) < 2**32
    # kohya's precalculated hashes: the addnet hash (tensor data only), which the farm and the WebUI list
    assert metadata["sshs_model_hash"] == addnet_hash(path)
    assert lora_short_hash(path) == metadata["sshs_model_hash"][:12] and len(metadata["sshs_legacy_hash"]) == 8
    record = describe_file(path, "lora", "shapelora.safetensors", source="training", added_by="test")
    assert record.kind == "lora" and record.lora_hash == metadata["sshs_model_hash"][:12]
    assert record.metadata["ss_network_module"] == "networks.lora" and record.relpath == "Lora/shapelora.safetensors"


# -- the file on the render side ------------------------------------------------------------------------------

def test_the_lora_loads_through_the_farms_lora_path_and_acts_there_as_in_training(checkpoint: Path, done: Run,
                                                                                  tmp_path: Path) -> None:
    models = tmp_path / "models"
    path = models / "Lora" / "shapelora.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(done.result.file_bytes)
    farm = load_pipeline(checkpoint)  # its own pipeline: peft adapters change the module tree
    base_cond, base = unet_input(farm)
    # The trainee holding the file's (fp16) tensors, hooked on as in training: the reference.
    trainee = LoraTrainee(farm, lora_spec())
    trainee.load_tensors({k: v.float() for k, v in load(done.result.file_bytes).items() if not k.endswith(".alpha")})
    with trainee.applied():
        trained_cond, trained = unet_input(farm)
    cache = LoraCache()
    cache.apply(farm, [LoraRequest("shapelora", 1.0, path)])
    peft_layers = [m for part in (farm.unet, farm.text_encoder) for m in part.modules() if hasattr(m, "lora_A")]
    assert len(peft_layers) == len(trainee.targets) == 7 * 12 + 3 * 6  # every module of the file found its layer
    cond, full = unet_input(farm)
    assert torch.allclose(cond, trained_cond, atol=1e-5) and torch.allclose(full, trained, atol=1e-5)
    assert not torch.allclose(cond, base_cond) and not torch.allclose(full, base)
    cache.apply(farm, [LoraRequest("shapelora", 0.0, path)])
    assert torch.equal(unet_input(farm)[1], base)  # weight 0: as without
    cache.apply(farm, [])
    assert torch.equal(unet_input(farm)[1], base)
    # A whole render through the engine: <lora:shapelora:1> changes the image, weight 0 leaves it as it was.
    engine = GenerationEngine(models)
    job = {"mode": "txt2img", "prompt": "red, circle", "negative_prompt": "", "steps": 2, "cfg_scale": 7.0,
           "sampler_name": "Euler", "scheduler": "Automatic", "seed": 1234, "subseed": 0, "subseed_strength": 0.0,
           "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "model": "demo", "vae": None, "clip_skip": 1,
           "eta_noise_seed_delta": 0}

    def render(weight: float | None) -> np.ndarray:
        loras = [] if weight is None else [{"name": "shapelora", "weight": weight, "file": "shapelora.safetensors",
                                           "hash": lora_short_hash(path)}]
        spec = RenderSpec.from_stored({**job, "loras": loras})
        return np.asarray(engine.render(farm, spec, dict(farm.scheduler.config), loras=cache)[0].image)

    plain = render(None)
    assert not np.array_equal(render(1.0), plain)
    assert np.array_equal(render(0.0), plain)
    # Training on a pipeline that holds render adapters: switched off, the LoRA goes on their base layers and
    # trains exactly as on a clean pipeline; switched on, it is refused.
    short = lora_spec(steps=2, save_every=0)
    cache.apply(farm, [])
    clean = train(load_pipeline(checkpoint), short, SAMPLES)
    assert train(farm, short, SAMPLES).losses == clean.losses
    cache.apply(farm, [LoraRequest("shapelora", 1.0, path)])
    with pytest.raises(ValueError, match="adapter of a render is active"):
        train(farm, short, SAMPLES)


# -- the warm pipeline ----------------------------------------------------------------------------------------

def test_the_pipeline_is_untouched_by_lora_training(pipe: Any, baseline: Snapshot, done: Run) -> None:
    trainee = LoraTrainee(pipe, lora_spec())
    with trainee.applied():
        assert sum(len(m._forward_hooks) for m in pipe.unet.modules()) == 7 * 12
        assert sum(len(m._forward_hooks) for m in pipe.text_encoder.modules()) == 3 * 6
    assert_untouched(pipe, baseline)
    assert not any(m._forward_hooks for part in (pipe.unet, pipe.text_encoder) for m in part.modules())

    def stop(report: StepReport) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # on_step raising stops the training: the hooks are gone all the same
        train(pipe, lora_spec(steps=3, save_every=0), SAMPLES, on_step=stop)
    assert_untouched(pipe, baseline)
    assert not any(m._forward_hooks for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


def test_a_layer_that_is_not_a_plain_linear_is_refused(pipe: Any, baseline: Snapshot) -> None:
    class Quantised(torch.nn.Linear):
        pass

    attention = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    original = attention.to_k
    odd = Quantised(original.in_features, original.out_features, bias=False)
    attention.to_k = odd
    try:
        with pytest.raises(ValueError, match=r"attn2\.to_k is a .*Quantised, not a plain torch Linear"):
            train(pipe, lora_spec(network_target="attention"), SAMPLES)
    finally:
        attention.to_k = original
    assert_untouched(pipe, baseline)


# -- create, and go on from a file ------------------------------------------------------------------------------

def test_zero_steps_makes_an_untrained_lora_and_start_from_goes_on_from_a_file(pipe: Any, baseline: Snapshot) -> None:
    made = train(pipe, lora_spec(steps=0, save_every=0, network_target="attention", train_text_encoder=False,
                                 network_dim=2, network_alpha=1.0), [])
    created = load(made.file_bytes)
    assert all(key.startswith("lora_unet_") and re.search(r"_attn[12]_to_(q|k|v|out_0)\.", key) for key in created)
    assert all(not bool(v.any()) for k, v in created.items() if k.endswith("lora_up.weight"))  # up: zeros
    assert all(v.shape[0] == 2 for k, v in created.items() if k.endswith("lora_down.weight"))
    # The request says otherwise; the file's rank, alpha and layers win.
    going_on = lora_spec(steps=3, save_every=0, start_from="Lora/x.safetensors", network_dim=8, train_text_encoder=True)
    result = train(pipe, going_on, SAMPLES, initial=made.file_bytes)
    trained = load(result.file_bytes)
    assert trained.keys() == created.keys()
    assert all(trained[k].shape == created[k].shape for k in created)
    assert any(not torch.equal(trained[k], created[k]) for k in created)
    metadata = file_metadata(result.file_bytes)
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "1.0"
    again = load(train(pipe, lora_spec(steps=0, start_from="x"), [], initial=made.file_bytes).file_bytes)
    assert all(torch.equal(again[k], created[k]) for k in created)
    with pytest.raises(ValueError, match="not a kohya LoRA"):
        train(pipe, lora_spec(steps=1, start_from="x"), SAMPLES, initial=save({"unet.x.lora_A.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="do not fit this LoRA"):  # a LoRA of another model
        train(pipe, lora_spec(steps=1, start_from="x"), SAMPLES, initial=save({
            "lora_unet_nowhere_to_q.lora_down.weight": torch.ones(2, 3), "lora_unet_nowhere_to_q.lora_up.weight":
            torch.zeros(3, 2)}))
    assert_untouched(pipe, baseline)


# -- bucketing --------------------------------------------------------------------------------------------------

def drawn(colour: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    ImageDraw.Draw(image).ellipse((8, 8, size[0] - 8, size[1] - 8), fill=colour)
    return image


BUCKETED = [TrainingSample(drawn((220, 30, 30), (160, 80)), "wide red"),
            TrainingSample(drawn((30, 30, 220), (80, 160)), "tall blue"),
            TrainingSample(drawn((30, 200, 30), (150, 70)), "wide green"),
            TrainingSample(drawn((240, 200, 20), (70, 150)), "tall yellow"),
            TrainingSample(drawn((20, 20, 20), (90, 90)), "square black")]


def test_bucketing_puts_each_aspect_ratio_in_its_bucket_and_each_micro_batch_in_one(pipe: Any,
                                                                                    baseline: Snapshot) -> None:
    # kohya's make_bucket_resolutions((96, 96), 64, 128, 32) and select_bucket
    assert bucket_resolutions(96, 96, 64, 128, 32) == [(64, 128), (96, 96), (128, 64)]
    at_512 = bucket_resolutions(512, 512, 256, 1024, 64)
    assert {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (1024, 256)} <= set(at_512)
    assert all(w * h <= 512 * 512 and 256 <= min(w, h) and max(w, h) <= 1024 and not w % 64 and not h % 64
               for w, h in at_512)
    assert select_bucket([(64, 128), (96, 96), (128, 64)], 160, 80).bucket == (128, 64)
    assert select_bucket([(64, 128), (96, 96), (128, 64)], 160, 80).resized == (128, 64)
    assert select_bucket([(64, 128), (96, 96), (128, 64)], 70, 150).resized == (64, 137)  # covers, then cropped
    spec = lora_spec(enable_bucket=True, training_width=96, training_height=96, min_bucket_reso=64,
                     max_bucket_reso=128, bucket_reso_steps=32, batch_size=2, gradient_step=2, steps=2, save_every=0)
    data = training_data(pipe.vae, spec, BUCKETED, "shapelora", 1000)
    assert isinstance(data, BucketedData)
    assert data.buckets == [(128, 64), (64, 128), (128, 64), (64, 128), (96, 96)]
    assert [tuple(latent.shape) for latent in data.images] == [(4, 8, 16), (4, 16, 8), (4, 8, 16), (4, 16, 8),
                                                               (4, 12, 12)]
    bucket_of = {sample.caption: data.buckets[i] for i, sample in enumerate(BUCKETED)}
    for step in range(12):
        batches = data.draw(step)
        assert len(batches) == 2
        taken = [prompt for batch in batches for prompt in batch.prompts]
        assert len(set(taken)) == len(taken)  # no image twice in a step
        for batch in batches:
            buckets = {bucket_of[prompt] for prompt in batch.prompts}
            assert len(buckets) == 1  # one bucket per micro-batch
            (width, height), = buckets
            assert batch.latents.shape[2:] == batch.noise.shape[2:] == (height // 8, width // 8)
        again = data.draw(step)
        assert all(a.prompts == b.prompts and torch.equal(a.noise, b.noise)
                   for a, b in zip(batches, again, strict=True))
    assert all(len({bucket_of[p] for p in batch.prompts}) == 1 for batch in data.probe())
    assert sorted(len(batch.prompts) for batch in data.probe()) == [1, 1, 2, 2, 2]  # 8 items over 3 buckets
    assert data.bucket_info() == {"buckets": {0: {"resolution": [64, 128], "count": 2},
                                              1: {"resolution": [96, 96], "count": 1},
                                              2: {"resolution": [128, 64], "count": 2}},
                                  "mean_img_ar_error": pytest.approx(data.bucket_info()["mean_img_ar_error"])}
    reports: list[StepReport] = []
    result = train(pipe, spec, BUCKETED, on_step=reports.append)  # the whole loop on buckets
    assert len(reports) == 2 and all(np.isfinite(r.loss) for r in reports)
    metadata = file_metadata(result.file_bytes)
    assert metadata["ss_enable_bucket"] == "True" and metadata["ss_min_bucket_reso"] == "64"
    info = json.loads(metadata["ss_bucket_info"])
    assert {b["count"] for b in info["buckets"].values()} == {1, 2} and "mean_img_ar_error" in info
    with pytest.raises(ValueError, match="bucket_reso_steps"):
        training_data(pipe.vae, spec.model_copy(update={"bucket_reso_steps": 12}), BUCKETED, "x", 1000)
    assert_untouched(pipe, baseline)

