"""The WebUI's prompt syntax, re-implemented without torch or lark.

Users paste prompts written for the AUTOMATIC1111 WebUI, so a prompt must mean here exactly what it
means there: the same emphasis weights (down to the float rounding), the same prompt-editing
schedule, the same ``AND`` split and the same ``<lora:...>`` extraction. Each function below mirrors
one function of the WebUI (``modules/prompt_parser.py`` and ``modules/extra_networks.py``) and its
tests hold the WebUI's own doctests. The schedule grammar, which the WebUI parses with an Earley
parser from ``lark``, is parsed here by a small hand-written recursive-descent parser that picks the
same derivation.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "extract_lora_tags",
    "parse_prompt_attention",
    "prompt_schedules",
    "split_and_prompts",
]

# --------------------------------------------------------------------------------------------------
# Emphasis: (text) x1.1, [text] /1.1, (text:1.3), escapes, BREAK.
# --------------------------------------------------------------------------------------------------

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]                       # an escaped bracket or backslash: literal text
    | \\                                 # a lone backslash: literal text (an empty one, see below)
    | \(                                 # opens x1.1 (or an explicit weight)
    | \[                                 # opens /1.1
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ":1.3)" closes a round bracket with an explicit weight
    | \)
    | \]
    | [^\\()\[\]:]+                      # plain text
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND_MULTIPLIER = 1.1
_SQUARE_MULTIPLIER = 1 / 1.1  # the WebUI multiplies by this rather than dividing by 1.1


def parse_prompt_attention(text: str) -> list[list[str | float]]:
    """Split a prompt into ``[text, weight]`` runs the way the WebUI weights CLIP tokens.

    ``BREAK`` becomes ``["BREAK", -1]``; brackets left open apply to the end of the prompt; runs of
    equal weight are merged. Raises ValueError for an explicit weight that is not a number, such as
    ``(a:1.2.3)``, where the WebUI fails the generation with the same error.
    """
    runs: list[list[str | float]] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for run in runs[start:]:
            run[1] *= multiplier  # type: ignore[operator]

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight = match.group("weight")
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            try:
                explicit = float(weight)
            except ValueError as e:
                raise ValueError(f"emphasis weight {weight!r} in {token!r} is not a number") from e
            multiply_from(open_round.pop(), explicit)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), _SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index > 0:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])

    for start in open_round:
        multiply_from(start, _ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, _SQUARE_MULTIPLIER)

    if not runs:
        return [["", 1.0]]

    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]  # type: ignore[operator]
        else:
            merged.append(run)
    return merged


# --------------------------------------------------------------------------------------------------
# Prompt editing: [from:to:when], [to:when], [from::when], [a|b].
#
# The WebUI's lark grammar, for reference:
#   start:      (prompt | /[][():]/+)*               stray brackets and colons allowed only here
#   prompt:     (emphasized | scheduled | alternate | plain | WHITESPACE)*
#   emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"      (kept verbatim)
#   scheduled:  "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
#   alternate:  "[" prompt ("|" [prompt])+ "]"
#   plain:      /([^\\\[\]():|]|\\.)+/
# Inside a bracket every bracket must match, so a construct starting at a given "[" or "(" has at
# most one parse; at the top level a bracket that starts no valid construct is plain text. Where a
# construct exists the WebUI's Earley parser takes it, except that when stray brackets follow (as in
# "[a:3]]") its pick depends on Python's per-process string hashing; we always take the construct.
# A "|" outside an alternation, or a backslash with nothing (or a newline) after it, makes the whole
# prompt fail to parse, and the WebUI then uses the prompt as plain text for every step.
# --------------------------------------------------------------------------------------------------

_WHEN = re.compile(r"\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")


@dataclass
class _Scheduled:
    before: list[_Item] | None
    after: list[_Item]
    number: str
    when: int = 0


@dataclass
class _Alternate:
    options: list[list[_Item]]


_Item = str | _Scheduled | _Alternate


class _Unparsable(Exception):
    """The WebUI's grammar has no parse for the prompt."""


class _ScheduleParser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.constructs: dict[int, tuple[list[_Item], int] | None] = {}

    def parse(self) -> list[_Item]:
        # Parse every bracket's construct from the right first: each then finds the constructs nested
        # in it already parsed, which keeps the recursion shallow and the work linear.
        for pos in reversed(self.bracket_positions()):
            self.construct(pos)
        text, items, pos = self.text, [], 0
        while pos < len(text):
            char = text[pos]
            if char in "[(":
                found = self.construct(pos)
                if found is not None:
                    items.extend(found[0])
                    pos = found[1]
                    continue
                items.append(char)
                pos += 1
            elif char in "]):":
                items.append(char)
                pos += 1
            elif char == "|":
                raise _Unparsable
            else:
                end = self.plain_end(pos)
                items.append(text[pos:end])
                pos = end
        return items

    def bracket_positions(self) -> list[int]:
        text, positions, pos = self.text, [], 0
        while pos < len(text):
            if text[pos] in "[(":
                positions.append(pos)
            pos = self.plain_end(pos) if text[pos] == "\\" else pos + 1
        return positions

    def plain_end(self, pos: int) -> int:
        """End of the plain text at ``pos``; a backslash takes the next character with it."""
        text = self.text
        while pos < len(text) and text[pos] not in "[]():|":
            if text[pos] == "\\":
                if pos + 1 >= len(text) or text[pos + 1] == "\n":
                    raise _Unparsable
                pos += 1
            pos += 1
        return pos

    def prompt(self, pos: int) -> tuple[list[_Item], int] | None:
        """A strict prompt from ``pos`` up to the next unmatched ``] ) : |`` or the end."""
        text, items = self.text, []
        while pos < len(text) and text[pos] not in "]):|":
            if text[pos] in "[(":
                found = self.construct(pos)
                if found is None:
                    return None
                items.extend(found[0])
                pos = found[1]
            else:
                end = self.plain_end(pos)
                items.append(text[pos:end])
                pos = end
        return items, pos

    def char_at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def construct(self, pos: int) -> tuple[list[_Item], int] | None:
        if pos not in self.constructs:
            self.constructs[pos] = self.round(pos) if self.text[pos] == "(" else self.square(pos)
        return self.constructs[pos]

    def round(self, pos: int) -> tuple[list[_Item], int] | None:
        inner = self.prompt(pos + 1)
        if inner is None:
            return None
        items, end = inner
        if self.char_at(end) == ")":
            return ["(", *items, ")"], end + 1
        if self.char_at(end) == ":":
            weight = self.prompt(end + 1)
            if weight is not None and self.char_at(weight[1]) == ")":
                return ["(", *items, ":", *weight[0], ")"], weight[1] + 1
        return None

    def square(self, pos: int) -> tuple[list[_Item], int] | None:
        first = self.prompt(pos + 1)
        if first is None:
            return None
        items, end = first
        separator = self.char_at(end)
        if separator == "]":
            return ["[", *items, "]"], end + 1
        if separator == "|":
            options = [items]
            while self.char_at(end) == "|":
                option = self.prompt(end + 1)
                if option is None:
                    return None
                options.append(option[0])
                end = option[1]
            return ([_Alternate(options)], end + 1) if self.char_at(end) == "]" else None
        if separator == ":":
            when = _WHEN.match(self.text, end + 1)
            if when is not None:
                return [_Scheduled(None, items, when.group("number"))], when.end()
            second = self.prompt(end + 1)
            if second is not None and self.char_at(second[1]) == ":":
                when = _WHEN.match(self.text, second[1] + 1)
                if when is not None:
                    return [_Scheduled(items, second[0], when.group("number"))], when.end()
        return None


def _collect_steps(items: list[_Item], steps: int, found: set[int]) -> None:
    for item in items:
        if isinstance(item, _Scheduled):
            value = float(item.number)
            if "." in item.number:  # "0.5" and "1.5" are fractions of the steps, "5" is a step
                value *= steps
            item.when = steps if value >= steps else (int(value) if math.isfinite(value) else 0)
            if item.when >= 1:
                found.add(item.when)
            _collect_steps(item.before or [], steps, found)
            _collect_steps(item.after, steps, found)
        elif isinstance(item, _Alternate):
            found.update(range(1, steps + 1))
            for option in item.options:
                _collect_steps(option, steps, found)


def _text_at(items: list[_Item], step: int) -> str:
    parts = []
    for item in items:
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, _Scheduled):
            parts.append(_text_at((item.before or []) if step <= item.when else item.after, step))
        else:
            parts.append(_text_at(item.options[(step - 1) % len(item.options)], step))
    return "".join(parts)


def prompt_schedules(prompt: str, steps: int) -> list[list[int | str]]:
    """``[[last_step, text], ...]``: the text to condition on up to and including each step.

    Same as the WebUI's ``get_learned_conditioning_prompt_schedules([prompt], steps)[0]`` with its
    current (1.6+) timeline: a ``when`` written with a ``.`` is a fraction of ``steps``, one without
    is a step number. A prompt the grammar cannot parse is used as-is for every step, never an error.
    """
    try:
        items = _ScheduleParser(prompt).parse()
        found = {steps}
        _collect_steps(items, steps, found)
        return [[step, _text_at(items, step)] for step in sorted(found)]
    except (_Unparsable, RecursionError):  # the WebUI also gives up on schedules nested thousands deep
        return [[steps, prompt]]


# --------------------------------------------------------------------------------------------------
# Composable diffusion: "a cat AND a dog:0.5".
# --------------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^(?P<text>.*?)(?:\s*:\s*(?P<weight>[-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def split_and_prompts(prompt: str) -> list[tuple[str, float]]:
    """Split on ``AND`` into ``(sub-prompt, weight)`` pairs, as the WebUI's multi-conditioning does.

    A trailing ``:number`` is a sub-prompt's weight (default 1.0) even when the prompt has no ``AND``;
    trailing whitespace is dropped, leading whitespace is kept.
    """
    pairs = []
    for subprompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.match(subprompt)
        assert match is not None  # the pattern matches any string
        weight = match.group("weight")
        pairs.append((match.group("text"), float(weight) if weight is not None else 1.0))
    return pairs


# --------------------------------------------------------------------------------------------------
# Extra networks: <lora:name:weight>.
# --------------------------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_TAG_NAMES = ("lora", "lyco")  # the WebUI's Lora extension also answers to the old "lyco" tag


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove every ``<network:args>`` tag like the WebUI does and return the LoRAs among them.

    Each LoRA is ``(name, weight)`` with the text-encoder multiplier as its weight: the second
    ``:``-separated argument or a ``te=`` argument, 1.0 when absent. Tags of other networks
    (``<hypernet:...>``) are removed from the prompt too, as the WebUI removes them before encoding.
    Raises ValueError for a weight that is not a number.
    """
    loras: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        if match.group(1) in _LORA_TAG_NAMES:
            loras.append(_lora_from_args(match.group(0), match.group(2).split(":")))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), loras


def hypernet_tags(prompt: str) -> list[tuple[str, float]]:
    """The ``<hypernet:name[:multiplier]>`` tags of a prompt, in order (the WebUI's extra network: multiplier 1.0
    when absent). Raises ValueError for a multiplier that is not a number."""
    found = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        if match.group(1) != "hypernet":
            continue
        args = match.group(2).split(":")
        try:
            found.append((args[0].strip(), float(args[1]) if len(args) > 1 and args[1].strip() else 1.0))
        except ValueError as exc:
            raise ValueError(f"{match.group(0)}: the multiplier must be a number") from exc
    return found


def _lora_from_args(tag: str, args: list[str]) -> tuple[str, float]:
    positional = [arg for arg in args if len(arg.split("=", 2)) != 2]
    named = dict(arg.split("=", 1) for arg in args if len(arg.split("=", 2)) == 2)
    if not positional:
        raise ValueError(f"{tag} names no LoRA; write <lora:name:weight>")
    weight = _lora_weight(tag, positional[1]) if len(positional) > 1 else 1.0
    if "te" in named:
        weight = _lora_weight(tag, named["te"])
    return positional[0], weight


def _lora_weight(tag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError as e:
        raise ValueError(f"the weight {text!r} in {tag} is not a number; write e.g. <lora:name:0.8>") from e
