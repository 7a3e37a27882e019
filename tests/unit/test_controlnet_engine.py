"""ControlNet in the engine, on tiny random-weight ControlNets the project builds (both file layouts, SD1.5 and SDXL)
at 64x64: they load through diffusers from the bundled configs, a unit steers the render, weight 0 is the render
without it pixel for pixel, control modes and guidance windows act as the extension's do, and ControlNet jobs
batch with each other within the stated tolerance."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.demo_models.controlnet import build_demo_controlnet, build_demo_controlnet_state
from devtools.demo_models.sd15 import build_demo_checkpoint
from devtools.demo_models.sdxl import build_demo_sdxl_checkpoint
from shared.controlnet.models import list_controlnets
from shared.controlnet.units import ControlMode, ControlUnit
from shared.jobs.contract import RenderSpec
from worker.engine.batch import BatchJob, BatchLimits
from worker.engine.checkpoint_loader import load_pipeline
from worker.engine.controlnet import SamplerStep, UnitPlan, sampler_steps, unit_active, unit_scales
from worker.engine.controlnet_loader import load_controlnet
from worker.engine.engine import GenerationEngine

from .test_batch_engine import within_tolerance

BASE: dict[str, Any] = {
    "model": "demo", "prompt": "a lighthouse", "negative_prompt": "blurry", "steps": 6, "cfg_scale": 7.0,
    "sampler_name": "Euler", "scheduler": "Automatic", "seed": 3, "width": 64, "height": 64,
}


def _control_png() -> bytes:
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 16, 48, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {"control.png": _control_png()}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cn") / "models"
    folder = root / "ControlNet"
    for layout in ("ldm", "diffusers"):
        build_demo_controlnet(folder / f"tiny-{layout}.safetensors", "demo-tiny", 0, layout)
        build_demo_controlnet(folder / f"tiny-xl-{layout}.safetensors", "demo-tiny-sdxl", 0, layout)
    (folder / "trap.pth").write_bytes(b"\x80\x04 never unpickled")
    return root


@pytest.fixture(scope="module")
def pipe(models: Path) -> Any:
    torch.set_num_threads(1)
    return load_pipeline(build_demo_checkpoint(models / "Stable-diffusion" / "demo.safetensors"))


@pytest.fixture(scope="module")
def engine(models: Path) -> GenerationEngine:
    return GenerationEngine(models)


def unit(models: Path, name: str = "tiny-ldm", **fields: Any) -> dict[str, Any]:
    (entry,) = [e for e in list_controlnets(models) if e.name == name]
    return {"module": "none", "model": entry.name, "model_title": entry.title, "model_location": entry.location,
            "image": "control.png", **fields}


def render(engine: GenerationEngine, pipe: Any, **overrides: Any) -> np.ndarray:
    spec = RenderSpec.from_stored({**BASE, **overrides})
    (image,) = engine.render(pipe, spec, dict(pipe.scheduler.config), load_image=IMAGES.__getitem__,
                             limits=BatchLimits(invariant=True))
    return np.asarray(image.image.convert("RGB")).astype(np.int16)


def test_both_layouts_load_through_diffusers_to_the_same_weights(models: Path) -> None:
    for arch, prefix in (("demo-tiny", "tiny"), ("demo-tiny-sdxl", "tiny-xl")):
        expected = build_demo_controlnet_state(arch, 0, "diffusers")
        for layout in ("ldm", "diffusers"):
            state = load_controlnet(models / "ControlNet" / f"{prefix}-{layout}.safetensors").state_dict()
            assert set(state) == set(expected)
            assert all(torch.equal(state[key].half(), expected[key]) for key in expected), (arch, layout)


def test_a_pickle_in_the_folder_is_listed_as_refused_and_never_opened(models: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("a pickle was opened"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (trap,) = [e for e in list_controlnets(models) if e.name == "trap"]
    assert not trap.loadable and "pickle" in (trap.refused_reason or "")
    with pytest.raises(ValueError, match="never opened"):
        load_controlnet(trap.path)


def test_listing_titles_carry_the_extensions_legacy_hash(models: Path) -> None:
    import hashlib

    (entry,) = [e for e in list_controlnets(models) if e.name == "tiny-ldm"]
    with open(entry.path, "rb") as file:
        file.seek(0x100000)
        expected = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
    assert entry.title == f"tiny-ldm [{expected}]"
    assert (entry.architecture, entry.family, entry.layout) == ("demo-tiny", "sd15", "ldm")


def test_a_unit_steers_the_render_and_weight_zero_is_no_controlnet_pixel_for_pixel(
        engine: GenerationEngine, pipe: Any, models: Path) -> None:
    plain = render(engine, pipe)
    assert np.array_equal(render(engine, pipe, controlnet=[unit(models, weight=0.0)]), plain)
    steered = render(engine, pipe, controlnet=[unit(models)])
    assert np.abs(steered - plain).mean() > 2.0
    # Both layouts of the same weights steer identically; a replay is bit-identical.
    assert np.array_equal(render(engine, pipe, controlnet=[unit(models, "tiny-diffusers")]), steered)
    assert np.array_equal(render(engine, pipe, controlnet=[unit(models)]), steered)


def test_weight_and_control_modes_move_the_render_as_the_extensions_do(
        engine: GenerationEngine, pipe: Any, models: Path) -> None:
    plain = render(engine, pipe)

    def distance(**fields: Any) -> float:
        return float(np.abs(render(engine, pipe, controlnet=[unit(models, **fields)]) - plain).mean())

    half, full = distance(weight=0.5), distance(weight=1.0)
    assert 0 < half < full
    # Soft injection weakens every residual but the middle block's: less steering than Balanced.
    prompt_first = distance(control_mode="My prompt is more important")
    assert 0 < prompt_first < full
    # ControlNet-first: soft scales on the cond rows only, CFG (7) amplifies the difference: more than prompt-first.
    control_first = distance(control_mode="ControlNet is more important")
    assert control_first > prompt_first


def test_guidance_window_limits_the_steps_a_unit_acts_on(engine: GenerationEngine, pipe: Any, models: Path) -> None:
    plain = render(engine, pipe)
    full = render(engine, pipe, controlnet=[unit(models)])
    late = render(engine, pipe, controlnet=[unit(models, guidance_start=0.5)])
    early = render(engine, pipe, controlnet=[unit(models, guidance_end=0.5)])
    never = render(engine, pipe, controlnet=[unit(models, guidance_start=1.0, guidance_end=1.0)])
    assert np.array_equal(never, plain)  # 6 steps: s/total reaches 4/6 at most, never 1.0
    for partial in (late, early):
        assert not np.array_equal(partial, full) and not np.array_equal(partial, plain)
    # Early steps shape the image: a unit on the first half moves it further than one on the second half.
    assert np.abs(early - plain).mean() > np.abs(late - plain).mean()


def test_sdxl_controlnet_steers_an_sdxl_render(models: Path, engine: GenerationEngine) -> None:
    pipe = load_pipeline(build_demo_sdxl_checkpoint(models / "Stable-diffusion" / "demo-xl.safetensors"))
    plain = render(engine, pipe)
    for layout in ("ldm", "diffusers"):
        steered = render(engine, pipe, controlnet=[unit(models, f"tiny-xl-{layout}")])
        assert np.abs(steered - plain).mean() > 1.0, layout
        assert np.array_equal(render(engine, pipe, controlnet=[unit(models, f"tiny-xl-{layout}", weight=0.0)]),
                              plain)


def test_controlnet_jobs_batch_together_within_the_tolerance(engine: GenerationEngine, pipe: Any,
                                                             models: Path) -> None:
    specs = [RenderSpec.from_stored({**BASE, "seed": seed, "controlnet": [unit(models, **fields)]})
             for seed, fields in ((5, {}), (6, {"weight": 0.4, "control_mode": "ControlNet is more important"}),
                                  (7, {"guidance_end": 0.3}))]
    assert len({spec.batch_key for spec in specs}) == 1
    jobs = [BatchJob(uuid.uuid4(), spec) for spec in specs]
    together = engine.render_batch(pipe, jobs, dict(pipe.scheduler.config), IMAGES.__getitem__)
    for job in jobs:
        (image,) = together[job.job_id]  # type: ignore[misc]
        assert image.batch_images == 3
        (solo,) = engine.render(pipe, job.spec, dict(pipe.scheduler.config), IMAGES.__getitem__,
                                limits=BatchLimits(invariant=True))
        assert within_tolerance(np.asarray(image.image), np.asarray(solo.image))


def test_scales_and_windows_follow_the_extension() -> None:
    plan = UnitPlan(0, None, torch.zeros(1), None, 0.8, ControlMode.PROMPT, 0.0, 0.5, ControlUnit.model_fields[
        "hr_option"].default, False)
    soft = unit_scales(plan, 13, sdxl=False, hires=False)
    assert soft[-1] == pytest.approx(0.8) and soft[0] == pytest.approx(0.8 * 0.825**12)
    assert unit_scales(plan, 10, sdxl=True, hires=False) == pytest.approx(soft[:10])
    balanced = UnitPlan(0, None, torch.zeros(1), None, 0.8, ControlMode.BALANCED, 0.0, 0.5, plan.hr_option, True)
    assert unit_scales(balanced, 13, sdxl=False, hires=False) == [0.8] * 13
    assert unit_scales(balanced, 13, sdxl=False, hires=True) == pytest.approx(soft)  # canny in the hires pass
    # 20 steps, end 0.5: the lagging counter keeps the unit on through step 11, as in the WebUI.
    active = [unit_active(plan, SamplerStep(step, 20)) for step in range(20)]
    assert active == [True] * 12 + [False] * 8
    assert sampler_steps(5, 2) == [0, 1, 1, 2, 2] and sampler_steps(3, 1) == [0, 1, 2]


def test_hires_and_inpainting_take_units_and_hr_option_picks_the_passes(engine: GenerationEngine, pipe: Any,
                                                                        models: Path) -> None:
    hires = {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6, "hr_second_pass_steps": 3}
    plain = render(engine, pipe, **hires)
    both = render(engine, pipe, **hires, controlnet=[unit(models)])
    low = render(engine, pipe, **hires, controlnet=[unit(models, hr_option="Low res only")])
    high = render(engine, pipe, **hires, controlnet=[unit(models, hr_option="High res only")])
    assert plain.shape == (96, 96, 3)
    assert len({arr.tobytes() for arr in (plain, both, low, high)}) == 4
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    IMAGES["mask.png"] = buffer.getvalue()
    inpaint = {"mode": "img2img", "init_images": ["control.png"], "mask": "mask.png", "denoising_strength": 0.75}
    plain_inpaint = render(engine, pipe, **inpaint)
    # A unit without its own image uses the init image; the kept half stays the init image's.
    steered = render(engine, pipe, **inpaint, controlnet=[{**unit(models), "image": None}])
    assert np.abs(steered[:, :24] - plain_inpaint[:, :24]).mean() > 1.0
    assert np.abs(steered[:, 48:] - plain_inpaint[:, 48:]).mean() < 1.0


def test_a_unit_with_an_annotator_runs_it_on_the_worker(engine: GenerationEngine, pipe: Any, models: Path) -> None:
    from tests.unit.test_controlnet_annotators import install

    install(models)
    plain = render(engine, pipe)
    hed = render(engine, pipe, controlnet=[unit(models, module="softedge_hed", processor_res=64)])
    none = render(engine, pipe, controlnet=[unit(models)])
    assert not np.array_equal(hed, plain) and not np.array_equal(hed, none)
