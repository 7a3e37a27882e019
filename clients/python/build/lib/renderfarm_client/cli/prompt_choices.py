"""`renderfarm build-prompt`'s options, turned into the prompt dictionary's choices (POST /v1/prompts/build)."""

from __future__ import annotations

import argparse
from typing import Any

# option -> choice key, for the single-valued choices
SINGLE = {"preset": "preset", "character": "character", "hair": "hair_length", "hair_style": "hair_style",
          "eye_color": "eye_color", "expression": "expression"}
HAIR_LENGTH_WORDS = ("long", "short")
# repeatable option -> list choice key
LISTS = {"hair_color": "hair_colors", "trait": "traits", "prop": "props"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="quality preset (portrait, background, ...)")
    parser.add_argument("--character", help="character preset id (ahri, edward_elric, inuyasha)")
    parser.add_argument("--hair", metavar="LENGTH", help="hair length: long or short (or 'long hair', 'random')")
    parser.add_argument("--hair-style", help='e.g. "pony tail", "twin tail"')
    parser.add_argument("--hair-color", action="append", metavar="COLOR",
                        help="once, or twice for two-tone hair; 'random' lets the seed pick")
    parser.add_argument("--eye-color", metavar="COLOR")
    parser.add_argument("--expression")
    parser.add_argument("--trait", action="append", help="extra trait (cat ears, cyberpunk, ...); repeatable")
    parser.add_argument("--outfit", help='outfit name, e.g. "maid uniform"')
    parser.add_argument("--outfit-color", metavar="COLOR", help="the outfit's colour")
    parser.add_argument("--prop", action="append", help="a prop; repeatable (more than a few get lost)")
    parser.add_argument("--blend", nargs=3, metavar=("FROM", "TO", "WHEN"),
                        help="blend two subjects as the WebUI's [FROM:TO:WHEN]")
    parser.add_argument("--seed", type=int, help="resolves 'random' picks; the same seed builds the same prompt")
    parser.add_argument("--json", action="store_true", help="print the farm's whole answer as JSON")


def choices_from(args: argparse.Namespace) -> dict[str, Any]:
    """Only what was given: everything left out is the dictionary's default."""
    choices: dict[str, Any] = {}
    for option, key in SINGLE.items():
        if getattr(args, option) is not None:
            choices[key] = getattr(args, option)
    for option, key in LISTS.items():
        if getattr(args, option):
            choices[key] = list(getattr(args, option))
    if choices.get("hair_length") in HAIR_LENGTH_WORDS:
        choices["hair_length"] = f"{choices['hair_length']} hair"  # the dictionary's own text
    if args.outfit or args.outfit_color:
        outfit = {"name": args.outfit, "color": args.outfit_color}
        choices["outfit"] = {k: v for k, v in outfit.items() if v is not None}
    if args.blend:
        source, target, when = args.blend
        choices["blend"] = {"from": source, "to": target, "when": _number(when)}
    return choices


def _number(value: str) -> float | int:
    number = float(value)
    return int(number) if number.is_integer() and "." not in value else number
