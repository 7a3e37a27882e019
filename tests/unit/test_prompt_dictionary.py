"""The prompt dictionary: the shipped vocabulary is the notes', every rule of the notes refuses by name,
random picks repeat from their seed, sections come in the notes' order, an operator's file replaces ours."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

import shared.prompt_dictionary.builder
from shared.errors import FieldError
from shared.prompt_dictionary.builder import PROPS_WARN_ABOVE, build_prompt
from shared.prompt_dictionary.vocabulary import (
    CATEGORY_SELECTS,
    SHIPPED_FILE,
    PromptDictionary,
    PromptDictionaryError,
    dictionary_file,
    load_prompt_dictionary,
    read_prompt_dictionary,
)
from shared.settings import ModelSettings, Settings
from shared.webui.prompts import prompt_schedules

COLORS = ["black", "blue", "brown", "golden", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow"]
QUALITY = ("(best quality), (masterpiece), (high resolution), hyper detail, ultra detailed face, "
           "Incredibly detailed hair,")
PORTRAIT_NEGATIVE_START = "(nsfw:2), lowres, ((bad anatomy)), ((bad hands)), text,"
LONG: dict[str, Any] = {"hair_length": "long hair"}


@pytest.fixture(scope="module")
def shipped() -> PromptDictionary:
    return read_prompt_dictionary(SHIPPED_FILE)


def build(dictionary: PromptDictionary, *, seed: int | None = 1, **choices: Any) -> Any:
    return build_prompt(dictionary, choices, seed)


def refused(dictionary: PromptDictionary, **choices: Any) -> FieldError:
    with pytest.raises(FieldError) as caught:
        build_prompt(dictionary, choices, 1)
    return caught.value


# -- the shipped vocabulary ------------------------------------------------------------------------------


def test_the_shipped_file_holds_the_notes_vocabulary_in_their_order(shipped: PromptDictionary) -> None:
    assert [c.key for c in shipped.categories] == list(CATEGORY_SELECTS)
    assert shipped.quality_line == QUALITY
    assert [(c.value, c.label_ko) for c in shipped.colors][:3] == [("black", "검은색"), ("blue", "파란색"),
                                                                   ("brown", "갈색")]
    assert shipped.color_values() == COLORS and "blonde" not in shipped.color_values()
    styles = shipped.category("hair_style")
    assert styles.values()[0] == "straight hair" and styles.values()[-1] == "(dreadlocks:1.3)"
    assert len(styles.values()) == 14 and styles.option("twin braides").label_ko == "양갈래 땋은 머리"  # type: ignore[union-attr]
    expression = shipped.category("expression")
    assert expression.option("empty eyes").companions == ("despair face",)  # type: ignore[union-attr]
    assert expression.option("crying").companions == ("tears",)  # type: ignore[union-attr]
    assert shipped.category("outfit").values()[:3] == ["kimono", "plate armor", "maid uniform"]
    assert len(shipped.category("outfit").values()) == 15 and len(shipped.category("props").values()) == 9
    assert shipped.category("traits").values() == ["cat ears", "cyberpunk", "Furry"]
    for category in shipped.categories:  # every option has a Korean label
        assert all(option.label_ko.strip() for option in category.options)


def test_the_quality_presets_are_the_notes(shipped: PromptDictionary) -> None:
    portrait, background = shipped.preset("portrait"), shipped.preset("background")
    assert portrait is not None and background is not None
    assert portrait.prompt.startswith("(portrait:1.3),(best quality),") and portrait.prompt.endswith("solo")
    assert portrait.negative_prompt.startswith(PORTRAIT_NEGATIVE_START)
    assert portrait.negative_prompt.endswith("long neck, ((jpeg artifacts)),")
    assert background.prompt.startswith("{extremely detailed CG unity 8k wallpaper}, {{{only background}}}")
    assert background.negative_prompt.startswith("human, man, men, woman, 1girl,") and not background.people


@pytest.mark.parametrize(("character_id", "seed", "fidelity"), [
    ("ahri", 1960455555, "high"), ("edward_elric", 1430793979, "low"), ("inuyasha", 2214400908, "low"),
])
def test_the_character_presets_carry_their_infotext_settings(shipped: PromptDictionary, character_id: str,
                                                             seed: int, fidelity: str) -> None:
    character = shipped.character(character_id)
    assert character is not None and character.fidelity == fidelity and character.note
    assert character.settings.model_dump() == {
        "steps": 13, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.0, "width": 507,
        "height": 676, "seed": seed, "model": "AnythingV5V3_v5PrtRE", "model_hash": "7f96a1a9ca"}
    assert character.negative_prompt.startswith(PORTRAIT_NEGATIVE_START)


# -- building ------------------------------------------------------------------------------------------


def test_doctests() -> None:
    results = doctest.testmod(shared.prompt_dictionary.builder)
    assert results.attempted == 3 and results.failed == 0


def test_sections_come_in_the_notes_order_one_per_line(shipped: PromptDictionary) -> None:
    built = build(shipped, hair_length="long hair", hair_style="pony tail", hair_colors=["black"], eye_color="red",
                  expression="bright face", traits=["cat ears", "cyberpunk"],
                  outfit={"name": "maid uniform", "color": "pink"}, props=["halo", "choker"],
                  blend={"from": "young", "to": "old", "when": 0.2})
    assert built.prompt.splitlines() == [
        QUALITY,
        "black hair, long hair, pony tail,",
        "red eyes, bright face, smile,",
        "cat ears, cyberpunk,",
        "pink maid uniform,",
        "halo, choker,",
        "[young:old:0.2],",
    ]
    assert built.negative_prompt.startswith(PORTRAIT_NEGATIVE_START)
    assert built.settings is None
    # The blend is the WebUI's prompt editing, as the farm's own parser reads it: "young" for 2 of 10 steps.
    schedules = prompt_schedules(built.prompt, 10)
    assert [step for step, _ in schedules] == [2, 10] and str(schedules[0][1]).endswith("\nyoung,")


def test_two_hair_colours_are_two_tone_hair(shipped: PromptDictionary) -> None:
    built = build(shipped, **LONG, hair_colors=["black", "white"])
    assert built.prompt.splitlines()[1] == "two-tone hair, black hair, white hair, long hair,"


def test_defaults_are_a_random_hair_colour_and_random_color_eyes(shipped: PromptDictionary) -> None:
    built = build(shipped, **LONG)
    lines = built.prompt.splitlines()
    assert built.choices.hair_colors is not None and len(built.choices.hair_colors) == 1
    assert built.choices.hair_colors[0] in COLORS
    assert lines[1] == f"{built.choices.hair_colors[0]} hair, long hair,"
    assert lines[2] == "random color eyes,"
    assert built.choices.eye_color is None


def test_outfit_without_colour_and_companions(shipped: PromptDictionary) -> None:
    built = build(shipped, **LONG, hair_colors=["red"], expression="empty eyes", outfit={"name": "overalls, hard hat"})
    assert built.prompt.splitlines()[2:] == ["random color eyes, empty eyes, despair face,", "overalls, hard hat,"]
    built = build(shipped, **LONG, hair_colors=["red"], outfit={"name": "plate armor", "color": "green"})
    assert built.prompt.splitlines()[-1] == "green plate armor,"


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 2])
def test_random_picks_repeat_from_the_seed_and_from_the_resolved_choices(shipped: PromptDictionary,
                                                                       seed: int) -> None:
    choices = {"hair_length": "random", "hair_style": "random", "hair_colors": ["random", "random"],
               "eye_color": "random", "expression": "random", "outfit": {"name": "random", "color": "random"}}
    first, again = build(shipped, seed=seed, **choices), build(shipped, seed=seed, **choices)
    assert first.prompt == again.prompt and first.choices == again.choices and first.seed == seed
    resolved = first.choices.model_dump()
    assert "random" not in json.dumps(resolved)
    assert resolved["hair_length"] in ("long hair", "short hair") and resolved["eye_color"] in COLORS
    assert len(set(resolved["hair_colors"])) == 2  # two random colours are two different ones
    rebuilt = build_prompt(shipped, first.choices, seed + 1 if seed < 2**32 - 2 else 0)
    assert rebuilt.prompt == first.prompt and rebuilt.choices == first.choices


def test_different_seeds_pick_differently(shipped: PromptDictionary) -> None:
    picks = {tuple(build(shipped, seed=seed, **LONG).choices.hair_colors or ()) for seed in range(40)}
    assert len(picks) > 5


def test_no_seed_draws_one_and_returns_it(shipped: PromptDictionary) -> None:
    built = build(shipped, seed=None, **LONG, hair_colors="random")
    assert 0 <= built.seed < 2**32 - 1
    assert build(shipped, seed=built.seed, **LONG, hair_colors="random").prompt == built.prompt
    assert build(shipped, seed=-1, **LONG).seed != -1


def test_a_random_pick_does_not_move_the_others(shipped: PromptDictionary) -> None:
    one = build(shipped, seed=5, **LONG, eye_color="random")
    two = build(shipped, seed=5, **LONG, eye_color="random", expression="random")
    assert one.choices.eye_color == two.choices.eye_color and one.choices.hair_colors == two.choices.hair_colors


# -- the rules -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("choices", "key", "message"), [
    ({}, "hair_length", "exactly one hair length is required; choose one of: long hair, short hair"),
    ({"hair_length": ["long hair", "short hair"]}, "hair_length", "exactly one hair length"),
    ({"hair_length": "medium hair"}, "hair_length", "allowed: long hair, short hair"),
    ({**LONG, "hair_style": ["pony tail", "twin tail"]}, "hair_style", "at most one hair style; got 2"),
    ({**LONG, "hair_style": "mohawk"}, "hair_style", "unknown hair style 'mohawk'"),
    ({**LONG, "hair_colors": ["black", "white", "red"]}, "hair_colors", "one or two hair colours"),
    ({**LONG, "hair_colors": ["blonde"]}, "hair_colors", "unknown colour 'blonde'; allowed: black, blue"),
    ({**LONG, "hair_colors": ["red", "red"]}, "hair_colors", "two different colours"),
    ({**LONG, "eye_color": ["red", "blue"]}, "eye_color", "one eye colour only (odd eyes break images)"),
    ({**LONG, "eye_color": "violet"}, "eye_color", "unknown eye colour 'violet'"),
    ({**LONG, "expression": ["blush", "crying"]}, "expression", "one expression at most"),
    ({**LONG, "expression": "smirk"}, "expression", "allowed: empty eyes, heart in pupils"),
    ({**LONG, "traits": ["elf ears"]}, "traits", "unknown trait 'elf ears'; allowed: cat ears, cyberpunk, Furry"),
    ({**LONG, "traits": ["Furry", "Furry"]}, "traits", "chosen twice"),
    ({**LONG, "props": ["sword"]}, "props", "unknown prop 'sword'"),
    ({**LONG, "outfit": {"name": "bikini"}}, "outfit", "unknown outfit 'bikini'; allowed: kimono"),
    ({**LONG, "outfit": {"name": "kimono", "color": "teal"}}, "outfit", "unknown outfit colour 'teal'"),
    ({**LONG, "blend": {"from": "young", "to": "old", "when": 1.0}}, "blend", "between 0 and 1"),
    ({**LONG, "blend": {"from": "young", "to": "old", "when": 0}}, "blend", "between 0 and 1"),
    ({**LONG, "blend": {"from": "a:b", "to": "old", "when": 0.5}}, "blend", "must not contain"),
    ({**LONG, "blend": {"from": "", "to": " ", "when": 0.5}}, "blend", "needs a 'from' or a 'to'"),
    ({**LONG, "preset": "cinematic"}, "preset", "unknown preset 'cinematic'; allowed: portrait, background"),
    ({"character": "link"}, "character", "allowed: ahri, edward_elric, inuyasha"),
    ({"character": "ahri", "preset": "portrait"}, "character", "a quality preset or a character, not both"),
    ({"character": "ahri", "hair_length": "long hair"}, "hair_length", "'ahri' already sets hair_length"),
    ({"character": "inuyasha", "outfit": {"name": "kimono"}}, "outfit", "'inuyasha' already sets outfit"),
    ({"preset": "background", "hair_length": "long hair"}, "hair_length", "draws no people"),
    ({"preset": "background", "props": ["halo"]}, "props", "draws no people"),
])
def test_every_rule_refuses_naming_the_choice(shipped: PromptDictionary, choices: dict[str, Any], key: str,
                                              message: str) -> None:
    error = refused(shipped, **choices)
    assert error.field == ("body", "choices", key) and error.status_code == 422
    assert message in error.message, error.message


def test_the_error_location_is_the_callers(shipped: PromptDictionary) -> None:
    with pytest.raises(FieldError) as caught:
        build_prompt(shipped, {}, 1, field=("body", "prompt_builder", "choices"))
    assert caught.value.field == ("body", "prompt_builder", "choices", "hair_length")


# -- the notes' advice: built, with a warning ------------------------------------------------------------


def test_more_than_a_few_props_build_with_the_notes_warning(shipped: PromptDictionary) -> None:
    props = shipped.category("props").values()
    assert PROPS_WARN_ABOVE == 3  # the notes say "more than a few" and give no number
    assert build(shipped, **LONG, props=props[:PROPS_WARN_ABOVE]).warnings == ()
    assert build(shipped, **LONG).warnings == ()
    four = build(shipped, **LONG, props=props[:4])
    assert four.prompt.splitlines()[-1] == "sunglasses, gloves, earrings, choker,"  # not refused, not trimmed
    assert len(four.warnings) == 1
    warning = four.warnings[0]
    assert warning.startswith("4 props chosen (more than 3): ") and shipped.notes["props"] in warning
    assert "more than a few get swallowed" in warning
    assert build(shipped, **LONG, props=props).warnings[0].startswith("9 props chosen")


def test_the_props_warning_survives_a_dictionary_without_the_note(shipped: PromptDictionary) -> None:
    bare = shipped.model_copy(update={"notes": {}})
    warning = build(bare, **LONG, props=["halo", "wing", "choker", "gloves"]).warnings
    assert len(warning) == 1 and "more than a few get swallowed" in warning[0]
    worded = shipped.model_copy(update={"notes": {"props": "Keep it to two or three."}})
    assert build(worded, **LONG, props=["halo", "wing", "choker", "gloves"]).warnings == (
        "4 props chosen (more than 3): Keep it to two or three.",)


# -- presets and characters ------------------------------------------------------------------------------


def test_a_quality_preset_replaces_the_quality_line_and_the_negative_prompt(shipped: PromptDictionary) -> None:
    built = build(shipped, preset="portrait", **LONG, hair_colors=["pink"])
    lines = built.prompt.splitlines()
    assert lines[0].startswith("(portrait:1.3),") and lines[0].endswith("solo,")  # a comma closes every line
    assert lines[1] == "pink hair, long hair," and built.negative_prompt.startswith(PORTRAIT_NEGATIVE_START)
    background = build(shipped, preset="background")
    assert background.prompt.splitlines() == [shipped.preset("background").prompt]  # type: ignore[union-attr]
    assert background.negative_prompt.startswith("human, man, men") and background.choices.hair_colors is None


def test_a_character_contributes_its_lines_and_settings(shipped: PromptDictionary) -> None:
    built = build(shipped, character="ahri", eye_color="red", expression="blush")
    assert built.prompt.splitlines() == [
        "(portrait),(best quality),(masterpiece),(high resolution),(Extremely detailed and beautiful face),"
        "perfect anatomy,perfect finger,hyper detail,ultra detailed cloths,Incredibly detailed,",
        "ahri_league_of_legends,", "1girl,solo,", "short hair,black hair,cur hair,", "fox tail,fox ear,", "hanbok,",
        "red eyes, blush,",
    ]
    assert built.settings is not None and built.settings.seed == 1960455555 and built.settings.steps == 13
    assert built.choices.hair_colors is None  # a character is not given a random hair colour


def test_a_character_without_hair_lines_may_take_hair_choices(shipped: PromptDictionary) -> None:
    bare = build(shipped, character="edward_elric")
    assert bare.prompt.splitlines()[1:] == ["Edward Elric Fullmetal Alchemist,", "1boy,solo,"]
    styled = build(shipped, character="edward_elric", hair_colors=["golden"], hair_style="braides")
    assert styled.prompt.splitlines()[-1] == "golden hair, braides,"


# -- the operator's file ---------------------------------------------------------------------------------


def _settings(models_dir: Path) -> Settings:
    return Settings(models=ModelSettings(models_dir=models_dir))


def _write(models_dir: Path, change: Any) -> Path:
    data = json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))
    change(data)
    path = models_dir / "prompt-dictionary.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def test_an_operators_file_in_the_models_folder_replaces_the_shipped_one(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert dictionary_file(settings) == SHIPPED_FILE
    assert load_prompt_dictionary(settings).category("traits").values() == ["cat ears", "cyberpunk", "Furry"]

    def add_trait(data: dict[str, Any]) -> None:
        data["categories"][5]["options"].append({"value": "elf ears", "label_ko": "엘프 귀"})

    path = _write(tmp_path, add_trait)
    assert dictionary_file(settings) == path
    dictionary = load_prompt_dictionary(settings)
    assert dictionary.category("traits").values()[-1] == "elf ears"
    assert build(dictionary, **LONG, traits=["elf ears"]).prompt.splitlines()[3] == "elf ears,"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["categories"][1]["options"].append({"value": "pony tail", "label_ko": "x"}),
     "categories[1] (hair_style) options: 'pony tail' is listed twice"),
    (lambda d: d["categories"][4]["options"][2].pop("label_ko"), "categories[4].options[2].label_ko: Field required"),
    (lambda d: d["categories"].pop(0), "categories must be, in this order: hair_length"),
    (lambda d: d["categories"][0].update(select="many"), "categories[0] (hair_length): select must be 'one'"),
    (lambda d: d["categories"][2].update(options=[{"value": "x", "label_ko": "x"}]), "takes its options from"),
    (lambda d: d["characters"][0].update(sets=["hair"]), "characters[0] (ahri): sets names unknown categories"),
    (lambda d: d["colors"].append({"value": "red", "label_ko": "빨강"}), "colors: 'red' is listed twice"),
    (lambda d: d["characters"][1]["settings"].update(steps=0), "characters[1].settings.steps"),
])
def test_a_bad_operators_file_is_refused_naming_the_entry(tmp_path: Path, change: Any, message: str) -> None:
    path = _write(tmp_path, change)
    with pytest.raises(PromptDictionaryError) as caught:
        load_prompt_dictionary(_settings(tmp_path))
    assert str(path) in str(caught.value) and message in str(caught.value), str(caught.value)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "prompt-dictionary.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(PromptDictionaryError, match="cannot read it as JSON"):
        load_prompt_dictionary(_settings(tmp_path))


def test_two_random_hair_colours_need_two_colours_in_the_list(tmp_path: Path) -> None:
    _write(tmp_path, lambda d: d.update(colors=[{"value": "black", "label_ko": "검은색"}]))
    dictionary = load_prompt_dictionary(_settings(tmp_path))
    assert build(dictionary, **LONG, hair_colors=["random"]).choices.hair_colors == ["black"]
    error = refused(dictionary, **LONG, hair_colors=["random", "random"])
    assert error.field == ("body", "choices", "hair_colors") and "no colour is left" in error.message
