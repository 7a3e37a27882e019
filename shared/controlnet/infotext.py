"""ControlNet units in the WebUI's infotext: written as the current extension writes them, read in every form it wrote.

Written (``scripts/infotext.py`` + ``ControlNetUnit.serialize``, extension v1.1.450+): one key per enabled unit,
``ControlNet <i>``, whose value is ``"Module: canny, Model: name [hash], Weight: 1.0, Resize Mode: Crop and Resize,
Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False,
Control Mode: Balanced"`` (Python ``str()`` of each value; the WebUI quotes the whole value).

Read, besides that form and its 2023-24 superset (``Low Vram``, ``Hr Option``, ``Save Detected Map``):
- v1.1.141-v1.1.30x: ``ControlNet 0: "preprocessor: canny, model: ..., weight: 1, starting/ending: (0, 1), resize
  mode: ..., pixel perfect: False, control mode: Balanced, preprocessor params: (512, 100, 200)"``;
- v1.1.113-v1.1.140, flat keys (our users' infotexts): ``ControlNet Enabled: True, ControlNet Preprocessor: ...,
  ControlNet Model: ..., ControlNet Weight: 0.8, ControlNet Starting Step: 0, ControlNet Ending Step: 1, ControlNet
  Resize Mode: ..., ControlNet Pixel Perfect: False, ControlNet Control Mode: ..., ControlNet Preprocessor
  Parameters: "(512, 64, 64)"`` (prefix ``ControlNet <i>`` with several units; Starting/Ending Step are fractions;
  the parameters are processor resolution, threshold A, threshold B);
- before v1.1.113: ``ControlNet-<i> Enabled/Module/Model/Weight/Guidance Start/Guidance End``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from shared.controlnet.units import ControlUnit

__all__ = ["unit_infotext", "units_from_infotext"]

# Current order (``infotext_fields``): display name -> unit field.
_FIELDS = (
    ("Module", "module"), ("Model", "model"), ("Weight", "weight"), ("Resize Mode", "resize_mode"),
    ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
    ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"), ("Pixel Perfect", "pixel_perfect"),
    ("Control Mode", "control_mode"),
)
_WRITTEN = {"model": "model_title"}  # the unit's model is written by its title, "name [hash]"
_READABLE = {"low_vram", "hr_option", *(name for _, name in _FIELDS)}
_KEYED = re.compile(r"^ControlNet(?: (\d+))?$")
_FLAT = re.compile(r"^ControlNet(?:[ -](\d+))? (Enabled|Preprocessor|Module|Model|Weight|Starting Step|Ending Step|"
                   r"Guidance Start|Guidance End|Resize Mode|Pixel Perfect|Control Mode|Preprocessor Parameters)$")
_FLAT_FIELDS = {"Preprocessor": "module", "Module": "module", "Model": "model", "Weight": "weight",
                "Starting Step": "guidance_start", "Ending Step": "guidance_end", "Guidance Start": "guidance_start",
                "Guidance End": "guidance_end", "Resize Mode": "resize_mode", "Pixel Perfect": "pixel_perfect",
                "Control Mode": "control_mode"}
_OLD_DICT_FIELDS = {"preprocessor": "module", "module": "module", "model": "model", "weight": "weight",
                    "resize mode": "resize_mode", "pixel perfect": "pixel_perfect", "control mode": "control_mode"}


def _text(value: object) -> str:
    if hasattr(value, "value") and isinstance(value.value, str):  # enums: their value, as the extension writes
        return value.value
    return str(value)


def unit_infotext(units: Sequence[ControlUnit]) -> dict[str, str]:
    """``{"ControlNet 0": "Module: ..., ...", ...}`` for the enabled units, in order."""
    return {f"ControlNet {i}": ", ".join(f"{label}: {_text(getattr(unit, _WRITTEN.get(name, name)))}"
                                         for label, name in _FIELDS)
            for i, unit in enumerate(units)}


def _value(text: str) -> Any:
    """The extension's ``parse_value``: True/False, else int, else float, else the string."""
    text = text.strip()
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _split_pairs(text: str) -> list[tuple[str, str]]:
    """``"Key: value, Key: (a, b), ..."`` -> pairs; commas inside parentheses stay in their value."""
    pairs, depth, current = [], 0, ""
    for char in text + ",":
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(depth - 1, 0)
        if char == "," and depth == 0:
            if current.strip():
                key, sep, value = current.strip().partition(": ")
                if not sep:
                    raise ValueError(f"{current.strip()!r} is not 'Key: value'")
                pairs.append((key.strip(), value.strip()))
            current = ""
        else:
            current += char
    return pairs


def _triple(text: str) -> list[Any]:
    return [_value(part) for part in text.strip().strip("()").split(",") if part.strip()]


def _from_keyed(text: str) -> dict[str, Any]:
    unit: dict[str, Any] = {}
    for key, raw in _split_pairs(text):
        if key in _OLD_DICT_FIELDS:  # v1.1.141-v1.1.30x, lower-case keys
            unit[_OLD_DICT_FIELDS[key]] = _value(raw)
        elif key == "starting/ending":
            unit["guidance_start"], unit["guidance_end"] = _triple(raw)[:2]
        elif key == "preprocessor params":
            unit.update(zip(("processor_res", "threshold_a", "threshold_b"), _triple(raw), strict=False))
        else:
            name = "_".join(word.lower() for word in key.split(" "))
            if name in _READABLE:
                unit[name] = _value(raw)
    return unit


def units_from_infotext(parsed: Mapping[str, object]) -> list[dict[str, Any]]:
    """The units an infotext records, as request fields (``UnitRequest``), ordered by index; disabled flat-format
    units are left out. Raises ValueError for a unit value that is not ``Key: value`` pairs."""
    keyed: dict[int, dict[str, Any]] = {}
    flat: dict[int, dict[str, Any]] = {}
    for key, value in parsed.items():
        match = _KEYED.match(key)
        if match:
            keyed[int(match.group(1) or 0)] = _from_keyed(str(value))
            continue
        match = _FLAT.match(key)
        if not match:
            continue
        unit = flat.setdefault(int(match.group(1) or 0), {})
        label, text = match.group(2), str(value)
        if label == "Enabled":
            unit["enabled"] = _value(text) is True
        elif label == "Preprocessor Parameters":
            unit.update(zip(("processor_res", "threshold_a", "threshold_b"), _triple(text), strict=False))
        else:
            unit[_FLAT_FIELDS[label]] = _value(text)
    found = {**flat, **keyed}
    return [unit for _, unit in sorted(found.items()) if unit.pop("enabled", True)]
