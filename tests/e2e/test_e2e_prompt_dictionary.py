"""A job built from the prompt dictionary renders on a real worker, and its image's infotext shows the built prompt."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from shared.webui.infotext import parse_infotext
from tests.farm_harness import Farm

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("farm", ["local"], indirect=True)]


def test_the_infotext_shows_the_built_prompt(farm: Farm) -> None:
    builder = {"choices": {"hair_length": "short hair", "hair_colors": ["white", "random"], "eye_color": "red",
                           "expression": "empty eyes", "props": ["halo"]}, "seed": 11}
    with farm.client() as c:
        built = c.post("/v1/prompts/build", json=builder).json()
    job = farm.wait_for(farm.submit({"prompt_builder": builder, "width": 64, "height": 64, "steps": 2,
                                     "seed": 5})["id"])
    assert job["status"] == "succeeded", job
    assert job["params"]["prompt"] == built["prompt"] and "\n" in built["prompt"]
    assert job["params"]["prompt_builder"] == {"choices": built["choices"], "seed": 11}
    resp = httpx.get(job["images"][0]["url"], timeout=30)
    assert resp.status_code == 200, resp.text
    png = Image.open(io.BytesIO(resp.content))
    parsed = parse_infotext(png.info["parameters"])
    assert parsed["Prompt"] == built["prompt"]
    assert parsed["Negative prompt"] == built["negative_prompt"]
    assert "red eyes, empty eyes, despair face," in str(parsed["Prompt"]).splitlines()
