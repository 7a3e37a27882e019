"""SDXL: detection from real-layout headers, the tiny SDXL single file (bit-identical load), the WebUI's
SDXL conditioning (two encoders, pooled embedding, size conditioning, zeroed empty negative) and renders
through the engine at 64x64 (seeds, batches, img2img, hires fix) plus the user errors it gives. LoRAs on SDXL:
tests/unit/test_sdxl_lora.py."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint, build_demo_sdxl_models
from shared.errors import FieldError
from shared.jobs.contract import RenderSpec
from tests.unit.test_checkpoint_loader import write_header_only
from worker.engine import ldm_layout
from worker.engine.batch import BatchLimits
from worker.engine.checkpoint_loader import (
    UnsupportedCheckpointError,
    check_weights_present,
    checkpoint_config_dir,
    detect_architecture,
    expected_weights,
    load_pipeline,
)
from worker.engine.engine import GenerationEngine
from worker.engine.sdxl_conditioning import SdxlEmbeddingLibrary, SdxlPromptEncoder, sdxl_prompt_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE = {
    "mode": "txt2img", "prompt": "a lighthouse, (stormy sea:1.2)", "negative_prompt": "blurry", "steps": 3,
    "cfg_scale": 7.0, "sampler_name": "Euler a", "scheduler": "Automatic", "seed": 1234, "subseed": 99,
    "subseed_strength": 0.0, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "model": "xl",
    "vae": None, "clip_skip": 1, "eta_noise_seed_delta": 0,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_sdxl_checkpoint(tmp_path_factory.mktemp("xl") / "tiny-xl.safetensors")


@pytest.fixture(scope="module")
def pipe(xl_file: Path):
    return load_pipeline(xl_file)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> GenerationEngine:
    root = tmp_path_factory.mktemp("models")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(root / "embeddings" / "glowstyle.safetensors"))
    (root / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(root / "Lora" / "cat.safetensors"))
    return GenerationEngine(root)


def render(pipe, engine, store=None, limits=None, **overrides):
    params = {**BASE, **overrides}
    loader = (lambda key: store[key]) if store else None
    return engine.render(pipe, RenderSpec.from_stored(params), dict(pipe.scheduler.config), load_image=loader,
                         limits=limits)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _meta_sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of a real SDXL base file, with its shape, from the bundled configs (no memory used)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = checkpoint_config_dir("sdxl")
    unet_config = UNet2DConditionModel.load_config(config / "unet")
    vae_config = AutoencoderKL.load_config(config / "vae")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
    mapped = ldm_layout.sdxl_diffusers_to_ldm(unet.state_dict(), unet_config, vae.state_dict(), vae_config,
                                              te1.state_dict(), te2.state_dict())
    return {key: tuple(t.shape) for key, t in mapped.items()}


# -- detection and layout ---------------------------------------------------------------------------

def test_real_layout_sdxl_header_is_detected_from_keys_and_complete(tmp_path: Path) -> None:
    shapes = _meta_sdxl_shapes()
    # Tensor counts of the published sd_xl_base_1.0.safetensors (2515 tensors: these 2513, plus
    # embedders.0's position_ids buffer and embedders.1's logit_scale, which no model needs).
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert [sum(k.startswith(p) for k in shapes) for p in prefixes] == [1680, 248, 196, 389]
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes["conditioner.embedders.1.model.positional_embedding"] == (77, 1280)
    assert shapes["model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    path = write_header_only(tmp_path / "sd_xl_base.safetensors", shapes)  # sparse: no disk used
    assert detect_architecture(path) == "sdxl"
    check_weights_present(path, checkpoint_config_dir("sdxl"))
    assert sum(expected_weights(checkpoint_config_dir("sdxl")).values()) == 3_468_837_867


def test_sdxl_inpainting_and_incomplete_files_are_refused(tmp_path: Path) -> None:
    probes = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    }
    with pytest.raises(UnsupportedCheckpointError, match="SDXL inpainting"):
        detect_architecture(write_header_only(tmp_path / "inpaint.safetensors", probes))
    probes["model.diffusion_model.input_blocks.0.0.weight"] = (320, 4, 3, 3)
    partial = write_header_only(tmp_path / "partial.safetensors", probes)
    assert detect_architecture(partial) == "sdxl"
    with pytest.raises(UnsupportedCheckpointError, match="incomplete checkpoint for sdxl"):
        load_pipeline(partial)


def test_tiny_sdxl_file_uses_the_sgm_layout_and_loads_bit_for_bit(xl_file: Path, pipe) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(xl_file), "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"renderfarm_arch": "demo-tiny-sdxl"}
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.2.weight" in keys
    assert xl_file.stat().st_size < 20_000_000
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    built = build_demo_sdxl_models(0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, actual = getattr(built, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == actual.keys(), name
        assert [k for k in expected if not torch.equal(expected[k], actual[k])] == [], name
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer.pad_token_id == 49407


def test_half_precision_load_keeps_the_sdxl_vae_in_float32(xl_file: Path) -> None:
    half = load_pipeline(xl_file, dtype=torch.float16)
    assert half.unet.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16 (force_upcast)


# -- conditioning ------------------------------------------------------------------------------------

def test_plain_prompt_conditioning_equals_diffusers_encode_prompt(pipe) -> None:
    encoder = SdxlPromptEncoder(pipe)
    ours, pooled = encoder.encode_with_pooled(["a photo of a cat", "blurry"])
    theirs, negative, their_pooled, negative_pooled = pipe.encode_prompt(
        "a photo of a cat", negative_prompt="blurry", do_classifier_free_guidance=True, device="cpu")
    assert ours.shape == (2, 77, 32 + 48) and pooled.shape == (2, 40)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], negative[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[0], their_pooled[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled[1], negative_pooled[0], rtol=0, atol=1e-6)


def test_emphasis_is_applied_and_mean_restored_per_encoder(pipe) -> None:
    encoder = SdxlPromptEncoder(pipe)
    plain, _ = encoder.encode_with_pooled(["a cat"])
    weighted, _ = encoder.encode_with_pooled(["a (cat:1.5)"])
    assert not torch.equal(plain, weighted)
    for part in (slice(0, 32), slice(32, 80)):  # CLIP-L, then OpenCLIP-G
        torch.testing.assert_close(weighted[..., part].mean(), plain[..., part].mean(), rtol=1e-4, atol=1e-6)
    long_prompt = ", ".join(["lighthouse"] * 40) + " BREAK stormy sea"
    assert encoder.encode_with_pooled([long_prompt])[0].shape[1] == 77 * 3  # 79 tokens, then BREAK


def test_empty_negative_prompt_is_zeros_like_the_webui(pipe, engine) -> None:
    from worker.engine.conditioning import build_conditioning

    encoder = SdxlPromptEncoder(pipe)
    job = build_conditioning(encoder, "a cat", "", 4)
    assert not job.uncond[0].cond.any() and not job.uncond[0].pooled.any()
    job = build_conditioning(encoder, "", "[:blurry:2]", 4)  # a negative with a non-empty segment is encoded
    assert all(entry.cond.any() for entry in job.uncond)
    assert job.conds[0][0][0].cond.any()  # an empty *positive* prompt is encoded, not zeroed
    empty, blurry = render(pipe, engine, negative_prompt=""), render(pipe, engine)
    assert not np.array_equal(pixels(empty[0].image), pixels(blurry[0].image))


# -- rendering ---------------------------------------------------------------------------------------

def test_render_is_deterministic_and_batch_image_k_equals_seed_plus_k_when_invariant(pipe, engine) -> None:
    invariant = BatchLimits(invariant=True)
    batch = render(pipe, engine, batch_size=2, n_iter=2, limits=invariant)
    assert [item.seed for item in batch] == [1234, 1235, 1236, 1237]
    assert all(item.image.size == (64, 64) for item in batch)
    again = render(pipe, engine, batch_size=2, n_iter=2, limits=invariant)
    for k, item in enumerate(batch):
        assert np.array_equal(pixels(item.image), pixels(again[k].image))
        (single,) = render(pipe, engine, seed=1234 + k)
        assert np.array_equal(pixels(item.image), pixels(single.image)), f"image {k} differs"
    assert not np.array_equal(pixels(batch[0].image), pixels(batch[1].image))
    assert pixels(batch[0].image).std() > 0


def test_size_conditioning_reaches_the_unet(pipe, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.Tensor] = []
    forward = type(pipe.unet).forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", spy)
    render(pipe, engine, width=96, height=64, steps=2, prompt="a AND b", sampler_name="Euler")
    assert seen and all(t.tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 3 for t in seen)


def test_img2img_and_hires_fix_render_on_sdxl(pipe, engine) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    store = {"init/a.png": buffer.getvalue()}
    first = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], denoising_strength=0.5)
    second = render(pipe, engine, store, mode="img2img", init_images=["init/a.png"], denoising_strength=0.5)
    assert np.array_equal(pixels(first[0].image), pixels(second[0].image))
    (hires,) = render(pipe, engine, enable_hr=True, hr_scale=2, hr_upscaler="Latent", denoising_strength=0.5,
                      hr_second_pass_steps=2)
    assert hires.image.size == (128, 128)


def test_broken_loras_and_sd15_embeddings_on_sdxl_are_user_errors(pipe, engine) -> None:
    before = pixels(render(pipe, engine, steps=2)[0].image)
    with pytest.raises(FieldError) as err:  # LoRAs load on SDXL (unit/test_sdxl_lora.py); a broken file is refused
        render(pipe, engine, loras=[{"name": "cat", "weight": 0.5, "file": "cat.safetensors", "hash": "0" * 12}])
    assert err.value.field == ("body", "loras") and "cat.safetensors" in err.value.message
    assert np.array_equal(pixels(render(pipe, engine, steps=2)[0].image), before)  # nothing half-loaded stays
    with pytest.raises(FieldError) as err:
        render(pipe, engine, negative_prompt="blurry, glowstyle")
    assert err.value.field == ("body", "negative_prompt") and "glowstyle" in err.value.message
    assert render(pipe, engine, prompt="a glow style lamp")  # a different word is plain text


def _token_rows(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two encoders' token-embedding rows of ``text``: an SDXL embedding equivalent to writing it."""
    rows = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
        rows.append(encoder.get_input_embeddings().weight[ids].detach().clone())
    assert rows[0].shape[0] == rows[1].shape[0]
    return rows[0], rows[1]


def test_sdxl_embeddings_inject_each_encoders_vectors(pipe, tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    red_l, red_g = _token_rows(pipe, "red cat")
    blue_l, blue_g = _token_rows(pipe, "blue dog")
    save_file({"clip_l": red_l, "clip_g": red_g}, str(folder / "redcat.safetensors"))
    save_file({"clip_l": red_l, "clip_g": blue_g}, str(folder / "mixcat.safetensors"))  # needs as many vectors
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "glowstyle.safetensors"))  # SD1.5 format
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(folder / "bigxl.safetensors"))
    names = ["bigxl", "glowstyle", "mixcat", "redcat"]
    encoder = sdxl_prompt_encoder(pipe, SdxlEmbeddingLibrary(folder), names, {"prompt": "a photo of redcat"})
    plain = SdxlPromptEncoder(pipe)
    z, pooled = encoder.encode_with_pooled(["a photo of redcat"])  # one text a call: batching moves low bits
    z_mix, pooled_mix = encoder.encode_with_pooled(["a photo of mixcat"])
    z_red, pooled_red = plain.encode_with_pooled(["a photo of red cat"])
    z_blue, pooled_blue = plain.encode_with_pooled(["a photo of blue dog"])
    assert torch.equal(z, z_red) and torch.equal(pooled, pooled_red)
    assert torch.equal(z_mix[..., :32], z_red[..., :32]) and torch.equal(z_mix[..., 32:], z_blue[..., 32:])
    assert torch.equal(pooled_mix, pooled_blue)  # the pooled embedding is OpenCLIP-G's alone
    assert not torch.equal(z_red, z_blue)
    assert set(encoder.used_embeddings) == {"redcat", "mixcat"}
    for name in ("glowstyle", "bigxl"):  # SD1.5 format, or widths of another checkpoint: refused
        with pytest.raises(FieldError) as err:
            sdxl_prompt_encoder(pipe, SdxlEmbeddingLibrary(folder), names, {"prompt": f"a {name} lamp"})
        assert err.value.field == ("body", "prompt") and name in err.value.message


def test_sdxl_embedding_renders_like_its_words_with_ti_hashes(pipe, tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "embeddings").mkdir()
    red_l, red_g = _token_rows(pipe, "red cat")
    path = tmp_path / "embeddings" / "redcat.safetensors"
    save_file({"clip_l": red_l, "clip_g": red_g}, str(path))
    engine = GenerationEngine(tmp_path)
    (with_embedding,) = render(pipe, engine, prompt="a (redcat:1.1) at night", steps=2)
    (with_words,) = render(pipe, engine, prompt="a (red cat:1.1) at night", steps=2)
    assert np.array_equal(pixels(with_embedding.image), pixels(with_words.image))
    assert with_embedding.infotext["TI hashes"] == f"redcat: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert "TI hashes" not in with_words.infotext
