"""ControlNet units as clients send them (the extension's fields, aliases and enum forms) and as infotexts record
them: the current format written and read back exactly, and every older format read, our users' own verbatim."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.controlnet.infotext import unit_infotext, units_from_infotext
from shared.controlnet.units import ControlMode, ControlUnit, HiresOption, ResizeMode, UnitRequest
from shared.webui.infotext import format_infotext, parse_infotext

USERS_INFOTEXT = (
    "ahri_league_of_legends, 1girl, solo\nNegative prompt: lowres\nSteps: 13, Sampler: DPM++ 2M Karras, CFG scale: 7, "
    "Seed: 1960455555, Size: 512x512, Clip skip: 2, ENSD: 31337, ControlNet Enabled: True, ControlNet Preprocessor: "
    "depth_midas, ControlNet Model: controlnetPreTrained_depthV10 [400750f6], ControlNet Weight: 0.8, ControlNet "
    "Starting Step: 0, ControlNet Ending Step: 1, ControlNet Resize Mode: Resize and Fill, ControlNet Pixel Perfect: "
    "False, ControlNet Control Mode: My prompt is more important, ControlNet Preprocessor Parameters: "
    '"(512, 64, 64)"'
)


def test_our_users_flat_infotext_is_one_unit() -> None:
    (unit,) = units_from_infotext(parse_infotext(USERS_INFOTEXT))
    assert unit == {"module": "depth_midas", "model": "controlnetPreTrained_depthV10 [400750f6]", "weight": 0.8,
                    "guidance_start": 0, "guidance_end": 1, "resize_mode": "Resize and Fill", "pixel_perfect": False,
                    "control_mode": "My prompt is more important", "processor_res": 512, "threshold_a": 64,
                    "threshold_b": 64}
    request = UnitRequest.model_validate(unit)
    assert request.resize_mode == ResizeMode.RESIZE_AND_FILL and request.control_mode == ControlMode.PROMPT


def stored_unit(**fields: object) -> ControlUnit:
    return ControlUnit.model_validate({"module": "canny", "model": "control_v11p_sd15_canny",
                                       "model_title": "control_v11p_sd15_canny [d14c016b]",
                                       "model_location": "models/ControlNet/control_v11p_sd15_canny.safetensors",
                                       "processor_res": 512, "threshold_a": 100, "threshold_b": 200, **fields})


def test_units_are_written_as_the_current_extension_writes_them_and_read_back_exactly() -> None:
    units = [stored_unit(), stored_unit(module="invert", weight=0.5, resize_mode="Resize and Fill",
                                        threshold_a=0.5, threshold_b=0.5, guidance_end=0.75,
                                        control_mode="ControlNet is more important")]
    fields = unit_infotext(units)
    assert fields["ControlNet 0"] == (
        "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0, "
        "Pixel Perfect: False, Control Mode: Balanced")
    text = format_infotext("a cat", "", {"Steps": 20, "Seed": 1, **fields, "Lora hashes": "x: 0123"})
    assert 'ControlNet 0: "Module: canny,' in text and text.index("ControlNet 1") < text.index("Lora hashes")
    recorded = units_from_infotext(parse_infotext(text))
    assert [UnitRequest.model_validate(unit).module for unit in recorded] == ["canny", "invert"]
    for unit, original in zip(recorded, units, strict=True):
        again = ControlUnit.model_validate({**original.model_dump(), **unit, "model": original.model})
        assert unit_infotext([again]) == unit_infotext([original])


def test_older_formats_are_read() -> None:
    head = "x\nSteps: 20, Sampler: Euler, Seed: 1, "
    dict_era = parse_infotext(head + 'ControlNet 0: "preprocessor: canny, model: cn [0123abcd], weight: 1, '
                              'starting/ending: (0, 0.5), resize mode: Crop and Resize, pixel perfect: True, control '
                              'mode: Balanced, preprocessor params: (384, 90, 180)"')
    assert units_from_infotext(dict_era) == [{
        "module": "canny", "model": "cn [0123abcd]", "weight": 1, "guidance_start": 0, "guidance_end": 0.5,
        "resize_mode": "Crop and Resize", "pixel_perfect": True, "control_mode": "Balanced", "processor_res": 384,
        "threshold_a": 90, "threshold_b": 180}]
    dashed = parse_infotext(head + "ControlNet-0 Enabled: True, ControlNet-0 Module: canny, ControlNet-0 Model: "
                            "a [0123abcd], ControlNet-0 Weight: 1, ControlNet-0 Guidance Start: 0, ControlNet-0 "
                            "Guidance End: 1, ControlNet-1 Enabled: False, ControlNet-1 Module: depth")
    assert [unit["module"] for unit in units_from_infotext(dashed)] == ["canny"]  # the disabled one is left out
    superset = parse_infotext(head + 'ControlNet 0: "Module: none, Model: a [0123abcd], Weight: 1, Resize Mode: '
                              'Just Resize, Low Vram: False, Processor Res: 512, Guidance Start: 0, Guidance End: 1, '
                              'Pixel Perfect: False, Control Mode: Balanced, Hr Option: Low res only, Save Detected '
                              'Map: True"')
    (unit,) = units_from_infotext(superset)
    assert unit["hr_option"] == "Low res only" and unit["low_vram"] is False and "save_detected_map" not in unit


@pytest.mark.parametrize(("given", "expected"), [
    ({"resize_mode": 0}, ResizeMode.JUST_RESIZE), ({"resize_mode": "Inner Fit (Scale to Fit)"},
                                                   ResizeMode.CROP_AND_RESIZE),
    ({"resize_mode": "Envelope (Outer Fit)"}, ResizeMode.RESIZE_AND_FILL), ({"resize_mode": 2},
                                                                            ResizeMode.RESIZE_AND_FILL),
    ({"control_mode": 2}, ControlMode.CONTROL), ({"control_mode": "My prompt is more important"}, ControlMode.PROMPT),
    ({"hr_option": 1}, HiresOption.LOW_RES_ONLY), ({"hr_option": "High res only"}, HiresOption.HIGH_RES_ONLY),
])
def test_enum_fields_take_the_extensions_strings_old_names_and_integers(given: dict[str, object],
                                                                        expected: object) -> None:
    unit = UnitRequest.model_validate(given)
    assert expected in (unit.resize_mode, unit.control_mode, unit.hr_option)


def test_legacy_aliases_and_image_forms() -> None:
    unit = UnitRequest.model_validate({"input_image": "abc", "lowvram": True, "guidance": 0.5, "mask_image": "m"})
    assert (unit.image, unit.low_vram, unit.guidance_end, unit.mask) == ("abc", True, 0.5, "m")
    assert UnitRequest.model_validate({"image": {"image": "i", "mask": "m"}}).mask == "m"
    assert UnitRequest.model_validate({"image": ["i", "m"]}).image == "i"
    with pytest.raises(ValidationError, match="input_image"):
        UnitRequest.model_validate({"input_image": "a", "image": "b"})
    with pytest.raises(ValidationError, match="control_mode must be one of"):
        UnitRequest.model_validate({"control_mode": 3})
    with pytest.raises(ValidationError, match="guidance_start"):
        UnitRequest.model_validate({"guidance_start": 0.8, "guidance_end": 0.2})
    with pytest.raises(ValidationError, match="weight"):
        UnitRequest.model_validate({"weight": 2.5})
    with pytest.raises(ValidationError, match="Extra inputs"):
        UnitRequest.model_validate({"guess_mode": True})
