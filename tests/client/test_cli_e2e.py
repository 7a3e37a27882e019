"""The `renderfarm` command against a real farm: a progress bar on a terminal, images on disk, exit codes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from renderfarm_client import Job
from renderfarm_client.pnginfo import read_png_text

from tests.client.cli_runner import cli_env, run, run_in_pty
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]

BAR = "━"  # rich's bar


def test_generate_draws_a_progress_bar_and_writes_the_png(farm: Farm, owner_key: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_in_pty("generate", "a lighthouse at dusk", "--model", "demo-tiny", "--seed", "7", "--steps", "8",
                        "--width", "64", "--height", "64", "-o", str(out), "--url", farm.base_url,
                        env=cli_env(key=owner_key))
    assert result.code == 0, result
    assert "\x1b[?25l" in result.stderr, "rich's live display hid the cursor: it drew on the terminal"
    assert BAR in result.stderr and "8/8" in result.stderr and "succeeded" in result.stderr, result.stderr[-2000:]
    written = result.stdout.split()
    assert len(written) == 1 and Path(written[0]).parent == out and written[0].endswith("-0.png")
    params = read_png_text(written[0])["parameters"]
    assert params.startswith("a lighthouse at dusk\n") and "Seed: 7," in params and "Steps: 8," in params

    info = run("png-info", written[0], env=cli_env())
    assert (info.code, info.stdout) == (0, params + "\n")

    job_id = Path(written[0]).name.removesuffix("-0.png")
    listed = run("jobs", "--json", "--url", farm.base_url, env=cli_env(key=owner_key))
    assert listed.code == 0 and job_id in [j["id"] for j in json.loads(listed.stdout)["jobs"]]
    table = run("jobs", env=cli_env(farm.base_url, owner_key))
    assert table.code == 0 and f"{job_id}\tsucceeded\tdemo-tiny\t" in table.stdout, "piped: tab-separated lines"
    watched = run("watch", job_id, "--json", env=cli_env(farm.base_url, owner_key))
    assert watched.code == 0 and json.loads(watched.stdout)["id"] == job_id


def test_img2img_from_a_local_file_with_any_other_field(farm: Farm, owner_key: str, tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), (20, 90, 200)).save(tmp_path / "blue.png")
    result = run("generate", "a blue square", "--init-image", str(tmp_path / "blue.png"), "--denoising-strength",
                 "0.4", "--steps", "3", "-W", "64", "-H", "64", "--set", "batch_invariant=true", "--set", "styles=[]",
                 "--json",
                 env=cli_env(farm.base_url, owner_key))
    assert result.code == 0, result
    job = json.loads(result.stdout)
    assert job["mode"] == "img2img" and job["status"] == "succeeded"
    assert job["params"]["batch_invariant"] is True and job["params"]["denoising_strength"] == 0.4
    assert [(i["width"], i["height"]) for i in job["images"]] == [(64, 64)]


def test_refusals_exit_3_and_name_the_field(farm: Farm, owner_key: str) -> None:
    env = cli_env(farm.base_url, owner_key)
    steps = run("generate", "a cat", "--steps", "0", env=env)
    assert steps.code == 3 and "422" in steps.stderr and "steps" in steps.stderr, steps
    model = run("generate", "a cat", "--model", "no-such-model", env=env)
    assert model.code == 3 and "no-such-model" in model.stderr, model
    missing = run("watch", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.code == 3 and "404" in missing.stderr
    bad_key = run("jobs", env=cli_env(farm.base_url, "rf_not_a_key"))
    assert bad_key.code == 3 and "401" in bad_key.stderr


def test_a_canceled_job_exits_1(farm: Farm, owner_key: str, start_blocker: Callable[[], Job]) -> None:
    start_blocker()
    env = cli_env(farm.base_url, owner_key)
    submitted = run("generate", "queued behind", "--steps", "2", "--width", "64", "--height", "64", "--no-wait",
                    env=env)
    assert submitted.code == 0, submitted
    job_id = submitted.stdout.strip()
    canceled = run("cancel", job_id, env=env)
    assert (canceled.code, canceled.stdout.strip()) == (0, f"{job_id} canceled")
    watched = run("watch", job_id, env=env)
    assert watched.code == 1 and "canceled" in watched.stderr, watched


def test_build_prompt(farm: Farm, owner_key: str) -> None:
    env = cli_env(farm.base_url, owner_key)
    built = run("build-prompt", "--hair", "long", "--hair-style", "pony tail", "--hair-color", "black",
                "--eye-color", "red", "--seed", "3", env=env)
    assert built.code == 0, built
    assert "black hair, long hair, pony tail," in built.stdout and "red eyes" in built.stdout
    assert "Negative prompt: " in built.stdout
    as_json = run("build-prompt", "--hair", "short", "--hair-color", "random", "--seed", "3", "--json", env=env)
    answer = json.loads(as_json.stdout)
    assert answer["seed"] == 3 and answer["choices"]["hair_length"] == "short hair"
    assert answer["choices"]["hair_colors"] != ["random"], "the random pick is resolved and recorded"
    again = json.loads(run("build-prompt", "--hair", "short", "--hair-color", "random", "--seed", "3", "--json",
                           env=env).stdout)
    assert again["prompt"] == answer["prompt"], "the same choices and seed build the same prompt"
    conflict = run("build-prompt", "--hair", "long", "--hair-color", "black", "--hair-color", "red",
                   "--hair-color", "blue", env=env)
    assert conflict.code == 3 and "hair_colors" in conflict.stderr, conflict
    props = ["--prop", "sunglasses", "--prop", "gloves", "--prop", "earrings", "--prop", "choker"]
    crowded = run("build-prompt", "--hair", "long", "--hair-color", "black", *props, env=env)
    assert crowded.code == 0 and "warning: 4 props chosen" in crowded.stderr, crowded
    assert "warning" not in crowded.stdout
