"""The prompt dictionary over the real API: its vocabulary, builds, 422s naming the choice, and jobs that carry
``prompt_builder`` (their stored params hold the built prompt; a bad choice stores nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.farm_harness import Farm

TINY = {"width": 64, "height": 64, "steps": 2}
CHOICES = {"hair_length": "long hair", "hair_style": "pony tail", "hair_colors": ["black", "random"],
           "eye_color": "random", "expression": "crying", "outfit": {"name": "maid uniform", "color": "pink"}}


@pytest.fixture
def client(api_only: Farm) -> Iterator[httpx.Client]:
    with api_only.client() as c:
        yield c


def _counts(farm: Farm) -> tuple[int, int]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    return rows, redis.Redis.from_url(farm.env["REDIS_URL"]).llen("render")


def _stored_params(farm: Farm, job_id: str) -> dict[str, Any]:
    engine = sa.create_engine(farm.env["DATABASE_URL"])
    with engine.connect() as conn:
        params = conn.execute(sa.text("SELECT params FROM jobs WHERE id::text = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    return dict(params)


def test_both_routes_need_a_key(api_only: Farm) -> None:
    anonymous = api_only.anonymous()
    assert anonymous.get("/v1/prompt-dictionary").status_code == 401
    assert anonymous.post("/v1/prompts/build", json={"choices": {}}).status_code == 401


def test_the_dictionary_has_the_studio_shape(client: httpx.Client) -> None:
    resp = client.get("/v1/prompt-dictionary")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"quality_line", "colors", "categories", "outfits", "presets", "characters", "notes"}
    assert body["colors"][0] == {"value": "black", "label_ko": "검은색"} and len(body["colors"]) == 12
    categories = {c["key"]: c for c in body["categories"]}
    assert [c["key"] for c in body["categories"]] == ["hair_length", "hair_style", "hair_colors", "eye_color",
                                                       "expression", "traits", "outfit", "props"]
    for category in body["categories"]:
        assert set(category) == {"key", "label", "label_ko", "select", "required", "max", "default", "options"}
        assert category["options"] and all(set(o) == {"value", "label_ko", "companions"} for o in category["options"])
    assert categories["hair_length"]["select"] == "one" and categories["hair_length"]["required"] is True
    assert categories["hair_colors"]["select"] == "colors" and categories["hair_colors"]["max"] == 2
    assert categories["hair_colors"]["default"] == "random"
    assert categories["hair_colors"]["options"][0] == {"value": "black", "label_ko": "검은색", "companions": []}
    assert categories["eye_color"]["select"] == "color" and categories["hair_style"]["select"] == "at_most_one"
    crying = next(o for o in categories["expression"]["options"] if o["value"] == "crying")
    assert crying["companions"] == ["tears"]
    assert body["outfits"][0] == {"value": "kimono", "label_ko": "기모노"}
    assert [p["id"] for p in body["presets"]] == ["portrait", "background"]
    assert set(body["presets"][0]) == {"id", "label", "prompt", "negative_prompt", "people"}
    assert [p["people"] for p in body["presets"]] == [True, False]  # the wallpaper preset draws no people
    ahri = body["characters"][0]
    assert [c["id"] for c in body["characters"]] == ["ahri", "edward_elric", "inuyasha"]
    assert set(ahri) == {"id", "name", "prompt", "negative_prompt", "settings", "fidelity", "note", "sets"}
    assert "hair_length" in ahri["sets"]  # "short hair" is in Ahri's prompt
    assert ahri["settings"]["seed"] == 1960455555 and ahri["settings"]["model"] == "AnythingV5V3_v5PrtRE"
    assert ahri["settings"]["sampler_name"] == "DPM++ 2M" and ahri["settings"]["scheduler"] == "Karras"
    assert "ahri_league_of_legends," in ahri["prompt"].splitlines() and ahri["fidelity"] == "high"
    assert "props" in body["notes"]


def test_a_build_repeats_from_its_resolved_choices(client: httpx.Client) -> None:
    resp = client.post("/v1/prompts/build", json={"choices": CHOICES, "seed": 42})
    assert resp.status_code == 200, resp.text
    built = resp.json()
    assert set(built) == {"prompt", "negative_prompt", "choices", "seed", "settings", "warnings"}
    assert built["seed"] == 42 and built["settings"] is None and built["warnings"] == []
    lines = built["prompt"].splitlines()
    second = built["choices"]["hair_colors"][1]
    assert lines[1] == f"two-tone hair, black hair, {second} hair, long hair, pony tail,"
    assert lines[2] == f"{built['choices']['eye_color']} eyes, crying, tears," and lines[3] == "pink maid uniform,"
    assert built["negative_prompt"].startswith("(nsfw:2), lowres,")
    again = client.post("/v1/prompts/build", json={"choices": built["choices"], "seed": None}).json()
    assert again["prompt"] == built["prompt"] and again["choices"] == built["choices"]


def test_a_character_build_returns_its_settings(client: httpx.Client) -> None:
    built = client.post("/v1/prompts/build", json={"choices": {"character": "inuyasha"}}).json()
    assert built["settings"]["seed"] == 2214400908 and built["settings"]["width"] == 507
    assert "long hair, white hair," in built["prompt"].splitlines()


def test_more_than_a_few_props_build_with_the_notes_warning(client: httpx.Client) -> None:
    note = client.get("/v1/prompt-dictionary").json()["notes"]["props"]
    three = {"hair_length": "long hair", "props": ["halo", "wing", "choker"]}
    resp = client.post("/v1/prompts/build", json={"choices": three, "seed": 1})
    assert resp.status_code == 200 and resp.json()["warnings"] == [], resp.text
    four = {**three, "props": [*three["props"], "fedora"]}
    resp = client.post("/v1/prompts/build", json={"choices": four, "seed": 1})
    assert resp.status_code == 200, resp.text  # advice, not a rule: the prompt is built all the same
    built = resp.json()
    assert built["prompt"].splitlines()[-1] == "halo, wing, choker, fedora,"
    assert built["warnings"] == [f"4 props chosen (more than 3): {note}"]
    assert "more than a few get swallowed" in note
    # The rules stay 422s, warnings or not.
    resp = client.post("/v1/prompts/build", json={"choices": {**four, "props": ["halo", "halo", "wing", "choker"]}})
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "choices", "props"], resp.text
    schema = client.get("/openapi.json").json()["components"]["schemas"]["BuiltView"]["properties"]["warnings"]
    assert schema["type"] == "array" and schema["items"] == {"type": "string"}


@pytest.mark.parametrize(("choices", "key", "message"), [
    ({"hair_length": ["long hair", "short hair"]}, "hair_length", "exactly one hair length"),
    ({"hair_length": "long hair", "hair_style": ["pony tail", "hime_cut"]}, "hair_style", "at most one"),
    ({"hair_length": "long hair", "hair_colors": ["red", "blue", "green"]}, "hair_colors", "one or two"),
    ({"hair_length": "long hair", "hair_colors": ["teal"]}, "hair_colors", "allowed: black, blue"),
    ({"hair_length": "long hair", "eye_color": ["red", "blue"]}, "eye_color", "odd eyes"),
    ({"hair_length": "long hair", "hair": "long"}, "hair", "Extra inputs are not permitted"),
])
def test_a_conflict_is_a_422_naming_the_choice(client: httpx.Client, choices: dict[str, Any], key: str,
                                               message: str) -> None:
    resp = client.post("/v1/prompts/build", json={"choices": choices, "seed": 1})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["loc"] == ["body", "choices", key] and message in detail[0]["msg"], detail


def test_a_job_with_prompt_builder_stores_the_built_prompt(api_only: Farm, client: httpx.Client) -> None:
    built = client.post("/v1/prompts/build", json={"choices": CHOICES, "seed": 7}).json()
    resp = client.post("/v1/jobs", json={"prompt_builder": {"choices": CHOICES, "seed": 7}, **TINY})
    assert resp.status_code == 202, resp.text
    params = _stored_params(api_only, resp.json()["id"])
    assert params["prompt"] == built["prompt"] and params["negative_prompt"] == built["negative_prompt"]
    assert params["prompt_builder"] == {"choices": built["choices"], "seed": 7}
    assert resp.json()["params"]["prompt"] == built["prompt"]


def test_a_prompt_sent_with_the_builder_follows_it_and_a_negative_prompt_wins(api_only: Farm,
                                                                              client: httpx.Client) -> None:
    body = {"prompt_builder": {"choices": CHOICES, "seed": 7}, "prompt": "at the beach", "negative_prompt": "blurry",
            **TINY}
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    params = _stored_params(api_only, resp.json()["id"])
    assert params["prompt"].splitlines()[0].startswith("(best quality)")
    assert params["prompt"].splitlines()[-1] == "at the beach" and params["negative_prompt"] == "blurry"


def test_a_character_job_takes_its_settings_where_the_request_is_silent(api_only: Farm,
                                                                        client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={"prompt_builder": {"choices": {"character": "edward_elric"}}, "steps": 2})
    assert resp.status_code == 202, resp.text
    params = _stored_params(api_only, resp.json()["id"])
    assert (params["width"], params["height"], params["seed"], params["cfg_scale"]) == (507, 676, 1430793979, 7.0)
    assert (params["sampler_name"], params["scheduler"], params["steps"]) == ("DPM++ 2M", "Karras", 2)
    assert params["model"] == "demo-tiny"  # the character's checkpoint is not installed here: the farm's default
    assert params["prompt"].splitlines()[1] == "Edward Elric Fullmetal Alchemist,"


@pytest.mark.parametrize(("extra", "loc", "message"), [
    ({"prompt_builder": {"choices": {"hair_length": ["long hair", "short hair"]}}},
     ["body", "prompt_builder", "choices", "hair_length"], "exactly one hair length"),
    ({"prompt_builder": {"choices": {"hair_length": "long hair", "props": ["sword"]}}},
     ["body", "prompt_builder", "choices", "props"], "unknown prop"),
    ({"prompt_builder": {"choices": {"hair_length": "long hair", "colour": "red"}}},
     ["body", "prompt_builder", "choices", "colour"], "Extra inputs"),
    ({"prompt_builder": {"choices": {"hair_length": "long hair"}}, "infotext": "a cat\nSteps: 2, Seed: 1, Size: 64x64"},
     ["body", "prompt_builder"], "not both"),
])
def test_bad_builder_choices_are_a_422_and_store_nothing(api_only: Farm, client: httpx.Client, extra: dict[str, Any],
                                                         loc: list[str], message: str) -> None:
    before = _counts(api_only)
    resp = client.post("/v1/jobs", json={**TINY, **extra})
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"]
    assert detail[0]["loc"] == loc and message in detail[0]["msg"], detail
    assert _counts(api_only) == before
