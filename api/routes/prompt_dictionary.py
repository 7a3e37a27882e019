"""Our users' prompt dictionary: its vocabulary, and choices built into a prompt (shared/prompt_dictionary)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from api.deps import CurrentKey, SettingsDep
from api.responses import ErrorView
from shared.prompt_dictionary.builder import build_prompt
from shared.prompt_dictionary.choices import PromptBuilderRequest
from shared.prompt_dictionary.vocabulary import (
    Category,
    PromptDictionary,
    PromptDictionaryError,
    load_prompt_dictionary,
)
from shared.settings import Settings

router = APIRouter(prefix="/v1", tags=["prompt dictionary"])
_BROKEN: dict[int | str, dict[str, Any]] = {
    500: {"model": ErrorView, "description": "the operator's prompt-dictionary.json is invalid (detail says where)"},
}


class ColorView(BaseModel):
    value: str
    label_ko: str


class OptionView(BaseModel):
    value: str
    label_ko: str
    companions: list[str]


class CategoryView(BaseModel):
    key: str
    label: str
    label_ko: str
    select: Literal["one", "at_most_one", "colors", "color", "many", "outfit"]
    required: bool
    max: int | None
    default: str | None
    options: list[OptionView] = Field(description="for colour categories: the colour list")


class PresetView(BaseModel):
    id: str
    label: str
    prompt: str
    negative_prompt: str
    people: bool = Field(True, description="False: the preset draws no people; person choices are refused with it")


class SettingsView(BaseModel):
    steps: int
    sampler_name: str
    scheduler: str
    cfg_scale: float
    width: int
    height: int
    seed: int
    model: str
    model_hash: str | None


class CharacterView(BaseModel):
    id: str
    name: str
    prompt: str
    negative_prompt: str
    settings: SettingsView
    fidelity: str
    note: str
    sets: list[str] = Field(default_factory=list, description="categories the character's prompt already decides; "
                                                              "choosing them too is refused")


class DictionaryView(BaseModel):
    quality_line: str
    colors: list[ColorView]
    categories: list[CategoryView]
    outfits: list[ColorView] = Field(description="the outfit category's options, written as '{colour} {outfit}'")
    presets: list[PresetView]
    characters: list[CharacterView]
    notes: dict[str, str]


class BuiltView(BaseModel):
    prompt: str
    negative_prompt: str
    choices: dict[str, Any] = Field(description="the choices with every random pick resolved: send them again to "
                                                "rebuild this prompt")
    seed: int
    settings: SettingsView | None = Field(description="a character's infotext settings; null without one")
    warnings: list[str] = Field(default_factory=list,
                                description="the notes' advice the choices go against (e.g. more than a few props "
                                            "get swallowed); the prompt is built all the same")


def _dictionary(settings: Settings) -> PromptDictionary:
    try:
        return load_prompt_dictionary(settings)
    except PromptDictionaryError as exc:
        raise HTTPException(500, detail=str(exc)) from exc


def _category(category: Category, dictionary: PromptDictionary) -> CategoryView:
    if category.select in ("colors", "color"):
        options = [OptionView(value=c.value, label_ko=c.label_ko, companions=[]) for c in dictionary.colors]
    else:
        options = [OptionView(value=o.value, label_ko=o.label_ko, companions=list(o.companions))
                   for o in category.options]
    return CategoryView(key=category.key, label=category.label, label_ko=category.label_ko, select=category.select,
                        required=category.required, max=category.max, default=category.default, options=options)


@router.get("/prompt-dictionary", response_model=DictionaryView, responses=_BROKEN)
def get_prompt_dictionary(key: CurrentKey, settings: SettingsDep) -> DictionaryView:
    """The vocabulary in the notes' order, with Korean labels, presets and characters (an operator's
    ``<models>/prompt-dictionary.json`` replaces the shipped one)."""
    dictionary = _dictionary(settings)
    return DictionaryView(
        quality_line=dictionary.quality_line,
        colors=[ColorView(value=c.value, label_ko=c.label_ko) for c in dictionary.colors],
        categories=[_category(category, dictionary) for category in dictionary.categories],
        outfits=[ColorView(value=o.value, label_ko=o.label_ko) for o in dictionary.category("outfit").options],
        presets=[PresetView(id=p.id, label=p.label, prompt=p.prompt, negative_prompt=p.negative_prompt,
                            people=p.people) for p in dictionary.presets],
        characters=[CharacterView(id=c.id, name=c.name, prompt=c.prompt, negative_prompt=c.negative_prompt,
                                  settings=SettingsView(**c.settings.model_dump()), fidelity=c.fidelity, note=c.note,
                                  sets=list(c.sets))
                    for c in dictionary.characters],
        notes=dict(dictionary.notes),
    )


@router.post("/prompts/build", response_model=BuiltView, responses=_BROKEN)
def build(body: PromptBuilderRequest, key: CurrentKey, settings: SettingsDep) -> BuiltView:
    """Choices → prompt and negative prompt; a broken rule is a 422 naming the choice (``detail[0].loc``), advice
    the notes give (more props than a few) is a ``warnings`` entry."""
    built = build_prompt(_dictionary(settings), body.choices, body.seed, field=("body", "choices"))
    return BuiltView(prompt=built.prompt, negative_prompt=built.negative_prompt,
                     choices=built.choices.model_dump(mode="json", by_alias=True), seed=built.seed,
                     settings=SettingsView(**built.settings.model_dump()) if built.settings is not None else None,
                     warnings=list(built.warnings))
