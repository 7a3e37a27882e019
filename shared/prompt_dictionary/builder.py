"""Choices from the prompt dictionary → a prompt, in the notes' section order, one section per line.

The notes' rules are checked here and refused with a :class:`~shared.errors.FieldError` naming the choice
and the rule ("the internal logic must make the other impossible to select"). The lines are:

1. the quality line (a preset's prompt, or a character's quality line, instead when chosen);
2. a character's own lines;
3. hair: colours, length, style (``black hair, long hair, pony tail,``); two colours are two-tone hair,
   written as WebUI users write it: ``two-tone hair, black hair, white hair, ...``;
4. eyes: ``red eyes`` (or the notes' default ``random color eyes``), the expression and its companions;
5. traits; 6. the outfit as "{colour} {outfit}"; 7. props;
8. the blend ``[from:to:when]``, last: the WebUI switches that text wherever it stands, and on its own
   line it never splits a section.

Every line ends with a comma, as the notes' quality and character lines do, so CLIP still sees the
sections apart where the WebUI joins them. A section nobody chose is left out.

``random`` (and a default the notes leave to chance: one hair colour) is drawn from ``seed``, one
independent generator per choice, and written into the returned choices: building those choices again
gives the same prompt with any seed.

A build that breaks no rule but goes against the notes' advice carries ``warnings``: more props than
:data:`PROPS_WARN_ABOVE` ("more than a few get swallowed") still build, as the notes allow several.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.errors import FieldError
from shared.prompt_dictionary.choices import MAX_BUILDER_SEED, BlendChoice, Choices, OutfitChoice
from shared.prompt_dictionary.vocabulary import Character, CharacterSettings, PromptDictionary, QualityPreset

__all__ = ["PROPS_WARN_ABOVE", "RANDOM", "BuiltPrompt", "build_prompt"]

RANDOM = "random"
RANDOM_EYES = "random color eyes"
# Categories that describe a person: none of them goes with a preset that draws no people.
_PERSON_KEYS = ("hair_length", "hair_style", "hair_colors", "eye_color", "expression", "traits", "outfit", "props")
# The notes allow several props but warn that "more than a few get swallowed" (the dictionary's notes.props);
# they give no number, so "a few" is taken as three: a fourth prop makes the build warn (it is not refused).
PROPS_WARN_ABOVE = 3
# The warning when an operator's dictionary has no notes.props of its own.
_PROPS_NOTE = "Several allowed but not recommended: more than a few get swallowed, and held props risk broken hands."


@dataclass(frozen=True)
class BuiltPrompt:
    prompt: str
    negative_prompt: str
    choices: Choices  # resolved: no "random" left, defaults written out
    seed: int
    settings: CharacterSettings | None  # a character's infotext settings
    warnings: tuple[str, ...] = ()  # the notes' advice the choices go against; the prompt is built all the same


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _line(*parts: str) -> str:
    text = ", ".join(part.strip() for part in parts if part.strip())
    return text if not text or text.endswith(",") else text + ","


class _Rules:
    """The checks and picks of one build; errors carry ``field`` + the choice's key."""

    def __init__(self, dictionary: PromptDictionary, seed: int, field: tuple[str | int, ...]) -> None:
        self.dictionary = dictionary
        self.seed = seed
        self.field = field

    def error(self, key: str, message: str) -> FieldError:
        return FieldError((*self.field, key), message)

    def pick(self, key: str, index: int, values: list[str]) -> str:
        """A seeded pick, independent of every other choice's (a new random elsewhere changes nothing here)."""
        return random.Random(f"{self.seed}:{key}:{index}").choice(values)

    def allowed(self, key: str, value: str, values: list[str], what: str) -> str:
        if value == RANDOM:
            return self.pick(key, 0, values)
        if value not in values:
            raise self.error(key, f"unknown {what} {value!r}; allowed: {', '.join(values)}, or {RANDOM}")
        return value

    def single(self, key: str, value: str | list[str] | None, what: str, rule: str) -> str | None:
        """At most one value of category ``key``, checked against its options (or the colours); None when not
        chosen."""
        values = _as_list(value)
        if len(values) > 1:
            raise self.error(key, f"{rule}; got {len(values)}: {', '.join(map(str, values))}")
        if not values:
            return None
        category = self.dictionary.category(key)
        known = self.dictionary.color_values() if category.select == "color" else category.values()
        return self.allowed(key, values[0], known, what)

    def many(self, key: str, values: list[str], what: str) -> list[str]:
        known = self.dictionary.category(key).values()
        for value in values:
            if value not in known:
                raise self.error(key, f"unknown {what} {value!r}; allowed: {', '.join(known)}")
            if values.count(value) > 1:
                raise self.error(key, f"{what} {value!r} is chosen twice; choose each at most once")
        return list(values)

    def hair_colors(self, value: list[str] | str | None, default: bool) -> list[str] | None:
        colors = self.dictionary.color_values()
        values = _as_list(value)
        if len(values) > 2:
            raise self.error("hair_colors", f"one or two hair colours (two = two-tone hair); got {len(values)}: "
                                            f"{', '.join(values)}")
        if not values:
            return [self.pick("hair_colors", 0, colors)] if default else None
        chosen: list[str] = []
        for index, color in enumerate(values):
            if color == RANDOM:
                left = [c for c in colors if c not in values and c not in chosen]
                if not left:
                    raise self.error("hair_colors", "no colour is left to pick at random for two-tone hair")
                color = self.pick("hair_colors", index, left)
            elif color not in colors:
                raise self.error("hair_colors", f"unknown colour {color!r}; allowed: {', '.join(colors)}, or {RANDOM}")
            if color in chosen:
                raise self.error("hair_colors", f"two-tone hair needs two different colours; got {color} twice")
            chosen.append(color)
        return chosen

    def outfit(self, outfit: OutfitChoice | None) -> OutfitChoice | None:
        if outfit is None:
            return None
        name = self.allowed("outfit", outfit.name, self.dictionary.category("outfit").values(), "outfit")
        color = outfit.color
        if color is not None:
            color = self.allowed("outfit", color, self.dictionary.color_values(), "outfit colour")
        return OutfitChoice(name=name, color=color)

    def blend(self, blend: BlendChoice | None) -> BlendChoice | None:
        if blend is None:
            return None
        if not 0.0 < blend.when < 1.0:
            raise self.error("blend", f"blend.when must be between 0 and 1 (the fraction of the steps after which "
                                      f"'from' becomes 'to'); got {blend.when}")
        for name, text in (("from", blend.from_), ("to", blend.to)):
            if any(char in text for char in "[]:\n"):
                raise self.error("blend", f"blend.{name} must not contain '[', ']', ':' or a line break: they would "
                                          f"break the [from:to:when] syntax; got {text!r}")
        if not blend.from_.strip() and not blend.to.strip():
            raise self.error("blend", "blend needs a 'from' or a 'to' text")
        return blend


def _check_combination(rules: _Rules, choices: Choices, people: bool, character: Character | None) -> None:
    given = {key for key in _PERSON_KEYS if getattr(choices, key) not in (None, [], "")}
    if not people:
        for key in _PERSON_KEYS:
            if key in given:
                raise rules.error(key, f"the {choices.preset!r} preset draws no people (its negative prompt excludes "
                                       f"them); leave {key} out")
    if character is not None:
        for key in character.sets:
            if key in given:
                raise rules.error(key, f"character {character.id!r} already sets {key} in its prompt; leave {key} "
                                       f"out or choose no character")


def _eyes_line(eye_color: str | None, expression: str | None, rules: _Rules, default: bool) -> str:
    eyes = f"{eye_color} eyes" if eye_color else (RANDOM_EYES if default else "")
    companions: tuple[str, ...] = ()
    if expression is not None:
        option = rules.dictionary.category("expression").option(expression)
        companions = option.companions if option is not None else ()
    return _line(eyes, expression or "", *companions)


def _warnings(dictionary: PromptDictionary, props: list[str]) -> tuple[str, ...]:
    if len(props) <= PROPS_WARN_ABOVE:
        return ()
    note = dictionary.notes.get("props", "").strip() or _PROPS_NOTE
    return (f"{len(props)} props chosen (more than {PROPS_WARN_ABOVE}): {note}",)


def _preset_and_character(rules: _Rules, choices: Choices) -> tuple[QualityPreset | None, Character | None]:
    dictionary = rules.dictionary
    preset = dictionary.preset(choices.preset) if choices.preset is not None else None
    if choices.preset is not None and preset is None:
        raise rules.error("preset", f"unknown preset {choices.preset!r}; allowed: "
                                    f"{', '.join(p.id for p in dictionary.presets) or 'none'}")
    character = dictionary.character(choices.character) if choices.character is not None else None
    if choices.character is not None and character is None:
        raise rules.error("character", f"unknown character {choices.character!r}; allowed: "
                                       f"{', '.join(c.id for c in dictionary.characters) or 'none'}")
    if preset is not None and character is not None:
        raise rules.error("character", "choose a quality preset or a character, not both: a character brings its "
                                       "own quality line and negative prompt")
    return preset, character


def build_prompt(dictionary: PromptDictionary, choices: Choices | Mapping[str, Any], seed: int | None = None,
                 *, field: tuple[str | int, ...] = ("body", "choices")) -> BuiltPrompt:
    """The prompt of ``choices``; raises FieldError at ``field`` + the choice's key when a rule is broken.

    ``seed`` None or -1 draws a new one (returned). Omitted keys take the notes' defaults: without a
    character, one random hair colour and ``random color eyes``. More than :data:`PROPS_WARN_ABOVE` props
    build, with the notes' warning in ``warnings``.

    >>> from shared.prompt_dictionary.vocabulary import SHIPPED_FILE, read_prompt_dictionary
    >>> built = build_prompt(read_prompt_dictionary(SHIPPED_FILE), {"hair_length": "long hair",
    ...                      "hair_style": "pony tail", "hair_colors": ["black"], "eye_color": "red"}, 1)
    >>> print(built.prompt.splitlines()[1:])
    ['black hair, long hair, pony tail,', 'red eyes,']
    """
    if not isinstance(choices, Choices):
        choices = Choices.model_validate(choices)
    if seed is None or seed == -1:
        seed = secrets.randbelow(MAX_BUILDER_SEED)
    rules = _Rules(dictionary, seed, field)
    preset, character = _preset_and_character(rules, choices)
    people = preset.people if preset is not None else True
    _check_combination(rules, choices, people, character)
    defaults = people and character is None  # the notes' defaults make a person; a character is one already

    hair_length = rules.single("hair_length", choices.hair_length, "hair length",
                               "exactly one hair length (the other must be impossible to select)")
    if hair_length is None and defaults:
        options = dictionary.category("hair_length").values()
        raise rules.error("hair_length", f"exactly one hair length is required; choose one of: {', '.join(options)}")
    hair_style = rules.single("hair_style", choices.hair_style, "hair style", "at most one hair style")
    hair_colors = rules.hair_colors(choices.hair_colors, default=defaults)
    eye_color = rules.single("eye_color", choices.eye_color, "eye colour",
                             "one eye colour only (odd eyes break images)")
    expression = rules.single("expression", choices.expression, "expression", "one expression at most")
    traits = rules.many("traits", choices.traits, "trait")
    outfit = rules.outfit(choices.outfit)
    props = rules.many("props", choices.props, "prop")
    blend = rules.blend(choices.blend)

    two_tone = ["two-tone hair"] if hair_colors and len(hair_colors) == 2 else []
    lines = [
        preset.prompt if preset is not None else character.quality_line if character is not None
        else dictionary.quality_line,
        *(character.lines if character is not None else ()),
        _line(*two_tone, *(f"{color} hair" for color in hair_colors or ()), hair_length or "", hair_style or ""),
        _eyes_line(eye_color, expression, rules, defaults),
        _line(*traits),
        _line(" ".join(part for part in (outfit.color, outfit.name) if part)) if outfit is not None else "",
        _line(*props),
        f"[{blend.from_}:{blend.to}:{blend.when!r}]," if blend is not None else "",
    ]
    negative = (preset.negative_prompt if preset is not None else character.negative_prompt if character is not None
                else dictionary.negative_prompt)
    resolved = choices.model_copy(update={
        "hair_length": hair_length, "hair_style": hair_style, "hair_colors": hair_colors, "eye_color": eye_color,
        "expression": expression, "traits": traits, "outfit": outfit, "props": props, "blend": blend,
    })
    return BuiltPrompt(prompt="\n".join(_line(line) for line in lines if line.strip()), negative_prompt=negative,
                       choices=resolved, seed=seed, settings=character.settings if character is not None else None,
                       warnings=_warnings(dictionary, props))
