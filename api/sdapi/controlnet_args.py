"""The ControlNet extension's request shape on the WebUI API: ``alwayson_scripts: {"controlnet": {"args": [...]}}``.

Each dict in ``args`` is a unit in the extension's field names; like the extension (API version 3) a unit is off
unless it says ``enabled: true``, and unknown keys are ignored (each reported in ``info``). Keys that ask for
something the farm does not do (per-layer weights, region masks, IP-Adapter inputs, batch folders) are a 422 when
set. The enabled units become the farm job's ``controlnet`` field; errors about them name the ``args`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.controlnet.units import UnitRequest
from shared.errors import FieldError

__all__ = ["ControlNetArgs", "controlnet_args", "is_controlnet_script"]

# Aliases the unit accepts besides its field names.
_ALIASES = {"input_image", "lowvram", "guidance", "mask_image"}
# Keys whose value changes the render in a way the farm does not support, and the values that mean "unused".
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "advanced_weighting": (None, []), "effective_region_mask": (None, ""), "ipadapter_input": (None, [], ""),
    "batch_images": (None, "", []), "batch_input_gallery": (None, []), "batch_mask_gallery": (None, []),
    "batch_mask_dir": (None, ""), "animatediff_batch": (False, None), "union_control_type": (None, "Unknown", ""),
}


def is_controlnet_script(name: str) -> bool:
    return name.strip().lower() == "controlnet"


@dataclass
class ControlNetArgs:
    """The enabled units (farm request fields), the ``args`` index each came from, and what was ignored."""

    units: list[dict[str, Any]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    script: str = "controlnet"

    def relocate(self, exc: FieldError) -> FieldError:
        """An error about the farm's ``controlnet[i]`` as one about the ``args`` entry it came from."""
        loc = exc.field
        if len(loc) >= 3 and loc[:2] == ("body", "controlnet") and isinstance(loc[2], int) \
                and loc[2] < len(self.positions):
            where = ("body", "alwayson_scripts", self.script, "args", self.positions[loc[2]], *loc[3:])
            return FieldError(where, exc.message, exc.status_code)
        return exc


def controlnet_args(scripts: dict[str, Any]) -> ControlNetArgs:
    """Read the extension's entry from ``alwayson_scripts`` (absent: no units)."""
    found = ControlNetArgs()
    name = next((key for key in scripts if is_controlnet_script(key)), None)
    if name is None:
        return found
    found.script = name
    entry = scripts[name]
    args = entry.get("args", []) if isinstance(entry, dict) else entry
    if not isinstance(args, list):
        raise FieldError(("body", "alwayson_scripts", name, "args"), "args must be a list of ControlNet units")
    known = set(UnitRequest.model_fields) | _ALIASES
    for index, arg in enumerate(args):
        loc = ("body", "alwayson_scripts", name, "args", index)
        if not isinstance(arg, dict):
            if arg not in (False, None, ""):
                raise FieldError(loc, "a ControlNet unit must be an object with the extension's fields")
            continue
        if not arg.get("enabled", False):
            if arg:
                found.warnings.append(f"ControlNet unit {index} is off (the extension's units need \"enabled\": "
                                      "true)")
            continue
        for key, value in arg.items():
            if key in _UNSUPPORTED and value not in _UNSUPPORTED[key]:
                raise FieldError((*loc, key), f"ControlNet {key} is not supported on this farm; leave it unset")
        ignored = sorted(key for key in arg if key not in known and key not in _UNSUPPORTED)
        if ignored:
            found.warnings.append(f"ControlNet unit {index}: {', '.join(ignored)} ignored (not used by the farm)")
        found.units.append({key: value for key, value in arg.items() if key in known})
        found.positions.append(index)
    return found
