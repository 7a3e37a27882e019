"""The `renderfarm` command where no farm is needed: png-info, usage errors, an unreachable farm, --help."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from devtools.embedded import free_port
from tests.client.cli_runner import cli_env, run

pytestmark = pytest.mark.unit

INFOTEXT = "a lighthouse\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 7, Size: 64x64"
DEAD_URL = f"http://127.0.0.1:{free_port()}"


def test_png_info_prints_the_parameters_without_a_farm(tmp_path: Path) -> None:
    info = PngInfo()
    info.add_text("parameters", INFOTEXT)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    result = run("png-info", str(tmp_path / "a.png"), env=cli_env(DEAD_URL))
    assert (result.code, result.stdout) == (0, INFOTEXT + "\n"), result.stderr
    as_json = run("png-info", "--json", str(tmp_path / "a.png"), env=cli_env(DEAD_URL))
    assert as_json.code == 0 and '"parameters"' in as_json.stdout


def test_png_info_bad_files_are_bad_input(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    (tmp_path / "notes.txt").write_text("hello")
    for name, message in [("plain.png", "no 'parameters'"), ("notes.txt", "not a PNG"), ("missing.png", "No such")]:
        result = run("png-info", str(tmp_path / name), env=cli_env())
        assert result.code == 3, (name, result)
        assert message in result.stderr, (name, result.stderr)


def test_usage_errors_exit_2() -> None:
    assert run("generate", "a cat", "--steps", "many", env=cli_env()).code == 2
    assert run("frobnicate", env=cli_env()).code == 2
    assert run(env=cli_env()).code == 2


def test_unreachable_farm_exits_4() -> None:
    result = run("generate", "a cat", "--url", DEAD_URL, "--key", "k", env=cli_env(), timeout=60)
    assert result.code == 4, result
    assert "127.0.0.1" in result.stderr and "no answer" in result.stderr


def test_help_documents_exit_codes_and_environment() -> None:
    result = run("--help", env=cli_env())
    assert result.code == 0
    for text in ("exit codes:", "RENDERFARM_URL", "RENDERFARM_API_KEY", "generate", "png-info", "build-prompt"):
        assert text in result.stdout
    assert "5  --timeout" in run("generate", "--help", env=cli_env()).stdout
