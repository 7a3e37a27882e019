"""The prompt dictionary's vocabulary: read from JSON, checked once, then immutable.

The farm ships our users' dictionary (``prompt-dictionary.json`` next to this module, transcribed from
their service notes); an operator replaces it by putting a file of the same shape at
``<models_dir>/prompt-dictionary.json``. The file is data, but the builder's rules are code, so a file
may change every option, label, colour, preset and character, and not the eight categories' keys, order
or kind of choice. A file that breaks a rule is refused with a message naming the entry at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.file_cache import FileVersionCache
from shared.settings import Settings

__all__ = [
    "CATEGORY_SELECTS", "SHIPPED_FILE", "OVERRIDE_NAME", "Category", "Character", "CharacterSettings", "Color",
    "Option", "PromptDictionary", "PromptDictionaryError", "QualityPreset", "dictionary_file",
    "load_prompt_dictionary", "read_prompt_dictionary",
]

SHIPPED_FILE = Path(__file__).resolve().parent / "prompt-dictionary.json"
OVERRIDE_NAME = "prompt-dictionary.json"

Select = Literal["one", "at_most_one", "colors", "color", "many", "outfit"]
# The categories in the notes' order, with the kind of choice each is; the builder's rules depend on both.
CATEGORY_SELECTS: dict[str, Select] = {
    "hair_length": "one",
    "hair_style": "at_most_one",
    "hair_colors": "colors",
    "eye_color": "color",
    "expression": "at_most_one",
    "traits": "many",
    "outfit": "outfit",
    "props": "many",
}


class PromptDictionaryError(ValueError):
    """The dictionary file is not usable; the message names the file and the entry at fault."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Color(_Frozen):
    value: str = Field(min_length=1, description="the English colour word put in the prompt")
    label_ko: str = Field(min_length=1)


class Option(_Frozen):
    value: str = Field(min_length=1, description="the prompt text, exactly as written into the prompt")
    label_ko: str = Field(min_length=1)
    companions: tuple[str, ...] = Field((), description="prompt text that always comes with this option")


class Category(_Frozen):
    key: str
    label: str = Field(min_length=1)
    label_ko: str = Field(min_length=1)
    select: Select
    required: bool = False
    max: int | None = Field(None, ge=1, description="most values a choice may hold; None: no limit")
    default: str | None = None
    options: tuple[Option, ...] = ()

    def option(self, value: str) -> Option | None:
        return next((option for option in self.options if option.value == value), None)

    def values(self) -> list[str]:
        return [option.value for option in self.options]


class QualityPreset(_Frozen):
    id: str = Field(min_length=1)
    label: str = Field(min_length=1)
    prompt: str
    negative_prompt: str
    people: bool = Field(True, description="False: the preset draws no people (its negative prompt excludes them)")


class CharacterSettings(_Frozen):
    """The generation settings of the character's infotext, in the WebUI's names."""

    steps: int = Field(ge=1)
    sampler_name: str
    scheduler: str
    cfg_scale: float
    width: int = Field(ge=64)
    height: int = Field(ge=64)
    seed: int = Field(ge=0, le=2**32 - 1)
    model: str
    model_hash: str | None = None


class Character(_Frozen):
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    quality_line: str
    lines: tuple[str, ...] = Field(min_length=1, description="the character's prompt, one line each")
    sets: tuple[str, ...] = Field((), description="categories the character's lines already decide")
    negative_prompt: str
    settings: CharacterSettings
    fidelity: Literal["high", "low"]
    note: str

    @property
    def prompt(self) -> str:
        return "\n".join((self.quality_line, *self.lines))


class PromptDictionary(_Frozen):
    version: Literal[1] = 1
    quality_line: str
    negative_prompt: str = Field(description="the notes' common negative prompt, used without a preset")
    colors: tuple[Color, ...] = Field(min_length=1)
    categories: tuple[Category, ...]
    presets: tuple[QualityPreset, ...] = ()
    characters: tuple[Character, ...] = ()
    notes: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> PromptDictionary:
        _unique("colors", [color.value for color in self.colors])
        keys = [category.key for category in self.categories]
        if keys != list(CATEGORY_SELECTS):
            raise ValueError(f"categories must be, in this order: {', '.join(CATEGORY_SELECTS)}; got {', '.join(keys)}")
        for index, category in enumerate(self.categories):
            where = f"categories[{index}] ({category.key})"
            if category.select != CATEGORY_SELECTS[category.key]:
                raise ValueError(f"{where}: select must be {CATEGORY_SELECTS[category.key]!r}, got {category.select!r}")
            if category.select in ("colors", "color"):
                if category.options:
                    raise ValueError(f"{where}: a colour category takes its options from 'colors'; remove its options")
            elif not category.options:
                raise ValueError(f"{where}: needs at least one option")
            _unique(f"{where} options", category.values())
        _unique("presets", [preset.id for preset in self.presets])
        _unique("characters", [character.id for character in self.characters])
        for index, character in enumerate(self.characters):
            unknown = [key for key in character.sets if key not in CATEGORY_SELECTS]
            if unknown:
                raise ValueError(f"characters[{index}] ({character.id}): sets names unknown categories {unknown}; "
                                 f"known: {', '.join(CATEGORY_SELECTS)}")
        return self

    def category(self, key: str) -> Category:
        return next(category for category in self.categories if category.key == key)

    def color_values(self) -> list[str]:
        return [color.value for color in self.colors]

    def preset(self, preset_id: str) -> QualityPreset | None:
        return next((preset for preset in self.presets if preset.id == preset_id), None)

    def character(self, character_id: str) -> Character | None:
        return next((character for character in self.characters if character.id == character_id), None)


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what}: {value!r} is listed twice")
        seen.add(value)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def read_prompt_dictionary(path: Path) -> PromptDictionary:
    """The dictionary in ``path``; raises PromptDictionaryError naming the file and the bad entry."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PromptDictionaryError(f"prompt dictionary {path}: cannot read it as JSON: {exc}") from exc
    try:
        return PromptDictionary.model_validate(raw)
    except ValidationError as exc:
        raise PromptDictionaryError(f"prompt dictionary {path}: {_describe(exc)}") from exc


def dictionary_file(settings: Settings) -> Path:
    """The operator's file in the models folder when there is one, else the shipped one."""
    override = settings.models.models_dir / OVERRIDE_NAME
    return override if override.is_file() else SHIPPED_FILE


_DICTIONARIES: FileVersionCache[PromptDictionary] = FileVersionCache(read_prompt_dictionary)


def load_prompt_dictionary(settings: Settings) -> PromptDictionary:
    """The dictionary in use, re-read only when its file changed (an operator's edit needs no restart)."""
    return _DICTIONARIES.get(dictionary_file(settings).resolve())
