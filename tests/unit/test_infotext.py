"""Infotexts as the WebUI writes and reads them.

Expected values were checked against the WebUI's ``create_infotext`` joining and its
``parse_generation_parameters`` (1.10), run outside this repository.
"""

from __future__ import annotations

import pytest

from shared.webui.infotext import INFOTEXT_KEY_ORDER, format_infotext, parse_infotext, quote, unquote

REFERENCE_FIELDS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 1363903108,
    "Size": "512x512",
    "Model hash": "7f96a1a9ca",
    "Model": "AnythingV5V3_v5PrtRE",
    "Clip skip": 2,
    "ENSD": 31337,
    "Version": "v1.10.1",
}
REFERENCE_LINE = (
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1363903108, Size: 512x512, "
    "Model hash: 7f96a1a9ca, Model: AnythingV5V3_v5PrtRE, Clip skip: 2, ENSD: 31337, Version: v1.10.1"
)

# A txt2img infotext with hires fix, a LoRA and embeddings, as the WebUI 1.9 writes it.
HIRES_LORA_INFOTEXT = (
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer, smile, <lora:add_detail:0.5>\n"
    "Negative prompt: (worst quality, low quality:1.4), EasyNegative, bad-hands-5\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 2909129475, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: AnythingV5V3_v5PrtRE, Denoising strength: 0.45, Clip skip: 2, "
    "ENSD: 31337, Hires upscale: 2, Hires steps: 15, Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c", Version: v1.9.4'
)

# The example in the docstring of the WebUI's parse_generation_parameters (an early 2023 infotext).
WEBUI_DOCSTRING_INFOTEXT = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
    "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

# What parse_generation_parameters fills in when an infotext says nothing else.
WEBUI_DEFAULTS = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}

# --------------------------------------------------------------------------------------------------
# format_infotext
# --------------------------------------------------------------------------------------------------


def test_the_reference_infotext() -> None:
    text = format_infotext("1girl, (portrait:1.3)", "lowres, (bad hands)", REFERENCE_FIELDS)
    assert text == f"1girl, (portrait:1.3)\nNegative prompt: lowres, (bad hands)\n{REFERENCE_LINE}"


def test_keys_follow_the_webuis_order_whatever_order_they_are_given_in() -> None:
    shuffled = dict(reversed(list(REFERENCE_FIELDS.items())))
    assert format_infotext("p", "", shuffled) == f"p\n{REFERENCE_LINE}"


def test_a_hires_lora_infotext_is_written_exactly_as_the_webui_writes_it() -> None:
    prompt, negative_line, _ = HIRES_LORA_INFOTEXT.split("\n")
    fields = {
        "Version": "v1.9.4",
        "TI hashes": "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Hires upscaler": "R-ESRGAN 4x+ Anime6B",
        "Hires steps": 15,
        "Hires upscale": 2,
        "Denoising strength": 0.45,
        "Steps": 28,
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": 7,
        "Seed": 2909129475,
        "Size": "512x768",
        "Model hash": "7f96a1a9ca",
        "Model": "AnythingV5V3_v5PrtRE",
        "Clip skip": 2,
        "ENSD": 31337,
    }
    negative = negative_line.removeprefix("Negative prompt: ")
    assert format_infotext(prompt, negative, fields) == HIRES_LORA_INFOTEXT


def test_an_inpainting_infotext() -> None:
    fields = {
        "Mask blur": 4,
        "Inpaint area": "Only masked",
        "Masked area padding": 32,
        "Masked content": "latent noise",
        "Steps": 30,
        "Sampler": "Euler a",
        "Schedule type": "Automatic",
        "CFG scale": 7.0,
        "Seed": 42,
        "Size": "512x512",
        "Denoising strength": 0.75,
        "Version": "v1.10.1",
    }
    assert format_infotext("a red door", "", fields) == (
        "a red door\nSteps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, "
        "Size: 512x512, Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, "
        "Masked area padding: 32, Masked content: latent noise, Version: v1.10.1"
    )


def test_unknown_keys_come_after_the_known_ones_and_before_version() -> None:
    fields = {"Version": "v1", "My script": "on", "Steps": 5, "ADetailer model": "face_yolov8n.pt", "Seed": 1}
    assert format_infotext("p", "", fields) == (
        "p\nSteps: 5, Seed: 1, My script: on, ADetailer model: face_yolov8n.pt, Version: v1"
    )


def test_key_order_starts_and_ends_like_create_infotext() -> None:
    assert INFOTEXT_KEY_ORDER[:8] == (
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Image CFG scale",
        "Seed",
        "Face restoration",
        "Size",
    )
    assert INFOTEXT_KEY_ORDER[-1] == "Version"
    assert len(set(INFOTEXT_KEY_ORDER)) == len(INFOTEXT_KEY_ORDER)
    for earlier, later in [
        ("Model hash", "Model"),
        ("VAE hash", "VAE"),
        ("Denoising strength", "Clip skip"),
        ("Clip skip", "ENSD"),
        ("Tiling", "Hires upscale"),
        ("Hires upscaler", "Lora hashes"),
        ("Lora hashes", "TI hashes"),
        ("Mask blur", "Lora hashes"),
    ]:
        assert INFOTEXT_KEY_ORDER.index(earlier) < INFOTEXT_KEY_ORDER.index(later)


def test_values_without_content_are_left_out() -> None:
    fields = {"Steps": 20, "Sampler": None, "CFG scale": 7, "VAE": "", "Seed": 3}
    assert format_infotext("p", "", fields) == "p\nSteps: 20, CFG scale: 7, Seed: 3"


@pytest.mark.parametrize(
    ("clip_skip", "written"), [(1, False), ("1", False), (0, False), (2, True), ("2", True)]
)
def test_clip_skip_is_written_only_above_one(clip_skip: object, written: bool) -> None:
    text = format_infotext("p", "", {"Steps": 20, "Clip skip": clip_skip})
    assert ("Clip skip" in text) is written


@pytest.mark.parametrize(
    ("value", "written"), [(7.0, "7.0"), (7, "7"), (6.5, "6.5"), (0.45, "0.45"), (True, "True")]
)
def test_values_are_written_with_str_like_the_webui(value: object, written: str) -> None:
    assert format_infotext("p", "", {"CFG scale": value}) == f"p\nCFG scale: {written}"


def test_values_with_commas_colons_or_newlines_are_json_quoted() -> None:
    fields = {
        "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef",
        "Hires prompt": 'line one\nline "two"',
        "Model": "sd:xl",
        "Hires upscaler": "4x-UltraSharp",
        "Hires negative prompt": "ünïcode, kept",
    }
    assert format_infotext("p", "", fields) == (
        'p\nModel: "sd:xl", Hires prompt: "line one\\nline \\"two\\"", '
        'Hires negative prompt: "ünïcode, kept", '
        'Hires upscaler: 4x-UltraSharp, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"'
    )


def test_an_already_quoted_value_is_not_quoted_twice() -> None:
    text = format_infotext("p", "", {"Lora hashes": '"add_detail: 7c6bad76eb54"'})
    assert text == 'p\nLora hashes: "add_detail: 7c6bad76eb54"'


def test_the_prompt_is_never_quoted_and_the_negative_line_is_left_out_when_empty() -> None:
    assert format_infotext("a, b: c\nsecond line", "", {"Steps": 1}) == "a, b: c\nsecond line\nSteps: 1"
    assert format_infotext("p", "n1\nn2", {"Steps": 1}) == "p\nNegative prompt: n1\nn2\nSteps: 1"


def test_a_value_equal_to_its_key_is_written_as_the_key_alone() -> None:
    assert format_infotext("p", "", {"Steps": 1, "Tiled": "Tiled"}) == "p\nSteps: 1, Tiled"


def test_the_whole_text_is_stripped_like_the_webuis() -> None:
    assert format_infotext("  p  ", "", {}) == "p"


def test_quote_and_unquote() -> None:
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"'
    assert quote('say "hi": now') == '"say \\"hi\\": now"'
    assert unquote('"a, b"') == "a, b"
    assert unquote('"broken') == '"broken'
    assert unquote('"not json\\"') == '"not json\\"'
    assert unquote("") == ""


# --------------------------------------------------------------------------------------------------
# parse_infotext
# --------------------------------------------------------------------------------------------------


def test_the_webuis_docstring_example() -> None:
    parsed = parse_infotext(WEBUI_DOCSTRING_INFOTEXT)
    assert parsed == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "45dee52b",
        "Prompt": WEBUI_DOCSTRING_INFOTEXT.split("\n")[0],
        "Negative prompt": WEBUI_DOCSTRING_INFOTEXT.split("\n")[1].removeprefix("Negative prompt: "),
        **WEBUI_DEFAULTS,
        "Emphasis": "Original",
    }


def test_a_hires_lora_infotext() -> None:
    parsed = parse_infotext(HIRES_LORA_INFOTEXT)
    assert parsed["Prompt"].endswith("smile, <lora:add_detail:0.5>")
    assert parsed["Negative prompt"] == "(worst quality, low quality:1.4), EasyNegative, bad-hands-5"
    assert parsed["Sampler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Clip skip"] == "2" and parsed["ENSD"] == "31337"
    assert parsed["Denoising strength"] == "0.45"
    assert parsed["Hires upscale"] == "2" and parsed["Hires steps"] == "15"
    assert parsed["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert parsed["TI hashes"] == "EasyNegative: c74b4e810b03, bad-hands-5: aa7651be154c"
    assert parsed["Version"] == "v1.9.4"
    assert parsed["Emphasis"] == "Original"
    assert "Downcast alphas_cumprod" not in parsed


def test_a_minimal_infotext_gets_every_webui_default() -> None:
    parsed = parse_infotext("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7")
    assert parsed == {
        "Steps": "20",
        "Sampler": "Euler",
        "CFG scale": "7",
        "Prompt": "a cat",
        "Negative prompt": "",
        **WEBUI_DEFAULTS,
    }


@pytest.mark.parametrize(
    ("sampler", "expected_sampler", "expected_schedule"),
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
        ("DPM2 a Karras", "DPM2 a", "Karras"),
        ("Euler SGMUniform", "Euler", "SGM Uniform"),
        ("Euler karras", "Euler", "Karras"),
        ("DDIM", "DDIM", "Automatic"),
        ("Euler a", "Euler a", "Automatic"),
        ("DPM++ 2M SDE Heun", "DPM++ 2M SDE Heun", "Automatic"),
    ],
)
def test_legacy_combined_sampler_names_are_split(
    sampler: str, expected_sampler: str, expected_schedule: str
) -> None:
    parsed = parse_infotext(f"p\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1")
    assert (parsed["Sampler"], parsed["Schedule type"]) == (expected_sampler, expected_schedule)


def test_an_explicit_schedule_type_leaves_the_sampler_alone() -> None:
    parsed = parse_infotext("p\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: Uniform, CFG scale: 7")
    assert (parsed["Sampler"], parsed["Schedule type"]) == ("DPM++ 2M Karras", "Uniform")


def test_a_legacy_hires_sampler_is_split_too() -> None:
    parsed = parse_infotext("p\nSteps: 20, Sampler: Euler, CFG scale: 7, Hires sampler: DPM++ 2M Karras")
    assert (parsed["Hires sampler"], parsed["Hires schedule type"]) == ("DPM++ 2M", "Karras")


def test_a_last_line_with_fewer_than_three_pairs_is_part_of_the_prompt() -> None:
    parsed = parse_infotext("a photo\nstyle: anime, mood: calm")
    assert parsed["Prompt"] == "a photo\nstyle: anime, mood: calm"
    assert "style" not in parsed


def test_sizes_split_into_two_keys() -> None:
    parsed = parse_infotext("p\nSteps: 20, Size: 512x768, Seed resize from: 640x480, Hires resize: 1024x1536")
    assert "Size" not in parsed
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert (parsed["Seed resize from-1"], parsed["Seed resize from-2"]) == ("640", "480")
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "1536")


def test_quoted_values_are_unquoted() -> None:
    parsed = parse_infotext(
        'p\nSteps: 20, Hires prompt: "a \\"b\\", c\\nd", Seed: 1, Odd: "not closed, Xy: 1, Z: 2'
    )
    assert parsed["Hires prompt"] == 'a "b", c\nd'
    assert parsed["Seed"] == "1"
    assert parsed["Odd"] == '"not closed'
    assert parsed["Xy"] == "1"
    assert "Z" not in parsed  # a key needs two characters


def test_a_key_with_an_empty_value_is_skipped() -> None:
    parsed = parse_infotext("p\nSteps: 20, Sampler: , CFG scale: 7, Seed: 1")
    assert "Sampler" not in parsed and parsed["CFG scale"] == "7"


def test_multi_line_prompt_and_negative_prompt() -> None:
    text = "line one\n  line two  \n\nline four\nNegative prompt: bad\nworse\nSteps: 1, Seed: 2, CFG scale: 3"
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "line one\nline two\n\nline four"
    assert parsed["Negative prompt"] == "bad\nworse"


def test_an_empty_first_negative_line_adds_no_newline() -> None:
    parsed = parse_infotext("p\nNegative prompt:\nbad\nSteps: 1, Seed: 2, CFG scale: 3")
    assert parsed["Negative prompt"] == "bad"


def test_parameters_only() -> None:
    parsed = parse_infotext("Steps: 20, Sampler: Euler a, CFG scale: 7")
    assert parsed["Prompt"] == "" and parsed["Steps"] == "20"


def test_emphasis_is_reported_only_when_the_prompt_uses_it() -> None:
    assert "Emphasis" not in parse_infotext("plain BREAK words\nSteps: 1, Seed: 2, CFG scale: 3")
    assert parse_infotext("[soft]\nSteps: 1, Seed: 2, CFG scale: 3")["Emphasis"] == "Original"
    assert (
        parse_infotext("p\nNegative prompt: (bad)\nSteps: 1, Seed: 2, CFG scale: 3")["Emphasis"] == "Original"
    )
    assert parse_infotext("(x)\nSteps: 1, Seed: 2, Emphasis: No norm")["Emphasis"] == "No norm"


def test_a_prompt_the_emphasis_parser_rejects_still_parses() -> None:
    parsed = parse_infotext("(a:1.2.3)\nSteps: 1, Seed: 2, CFG scale: 3")
    assert parsed["Prompt"] == "(a:1.2.3)" and "Emphasis" not in parsed


def test_a_hypernet_is_appended_to_the_prompt() -> None:
    parsed = parse_infotext("p\nSteps: 1, Seed: 2, Hypernet: anime, Hypernet strength: 0.5")
    assert parsed["Prompt"] == "p<hypernet:anime:0.5>"
    assert parse_infotext("p\nSteps: 1, Seed: 2, Hypernet: anime")["Prompt"] == "p<hypernet:anime:1.0>"


def test_old_hires_fix_first_pass_size_is_converted() -> None:
    parsed = parse_infotext("p\nSteps: 1, Size: 1024x1024, First pass size: 512x512")
    assert (parsed["Size-1"], parsed["Size-2"]) == (512, 512)
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == (1024, 1024)
    parsed = parse_infotext("p\nSteps: 1, Size: 1024x768, First pass size: 0x0")
    assert (parsed["Size-1"], parsed["Size-2"]) == (640, 448)


def test_fp8_weight_brings_its_lora_cache_default() -> None:
    parsed = parse_infotext("p\nSteps: 1, Seed: 2, FP8 weight: e4m3fn")
    assert parsed["Cache FP16 weight for LoRA"] is False
    assert "Cache FP16 weight for LoRA" not in parse_infotext("p\nSteps: 1, Seed: 2, CFG scale: 3")


@pytest.mark.parametrize(
    ("version", "prompt", "sampler", "expected"),
    [
        (
            "v1.5.1",
            "[a:b:3]",
            "DDIM",
            {"Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"},
        ),
        ("v1.5.1-1-gabc1234", "plain", "Euler", {"Downcast alphas_cumprod"}),
        ("1.6.0-RC-28-gabc", "[x]", "Euler", {"Old prompt editing timelines", "Downcast alphas_cumprod"}),
        ("v1.6.0", "[x]", "PLMS", {"Downcast alphas_cumprod"}),
        ("v1.7.0", "p", "Euler", {"Downcast alphas_cumprod"}),
        ("v1.7.0-224-g1234", "p", "Euler", {"Downcast alphas_cumprod"}),
        ("v1.7.0-225-g1234", "p", "Euler", set()),
        ("v1.10.1", "[x]", "DDIM", set()),
        ("f2.0.1v1.10.1-previous-313-g5a1c1ad", "[x]", "DDIM", set()),
        ("unknown", "[x]", "DDIM", set()),
    ],
)
def test_version_dependent_flags(version: str, prompt: str, sampler: str, expected: set[str]) -> None:
    parsed = parse_infotext(f"{prompt}\nSteps: 1, Sampler: {sampler}, Seed: 2, Version: {version}")
    flags = {"Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod"}
    assert {key for key in flags if parsed.get(key) is True} == expected


def test_refiner_switch_flag_for_old_refiner_infotexts() -> None:
    parsed = parse_infotext("p\nSteps: 1, Seed: 2, Refiner: sdxl_refiner [7440042bbd], Version: v1.7.0")
    assert parsed["Refiner switch by sampling steps"] is True


# --------------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------------

ROUND_TRIP_PROMPTS = [
    ("a cat", ""),
    (
        "masterpiece, (best quality:1.2), 1girl: smiling, [blue:red:0.5] hair",
        "lowres, (bad hands:1.4), text: logo",
    ),
    ("first line\nsecond, line: with colon", "neg one\nneg two"),
    ('quotes "inside" the prompt, and \\backslashes\\', 'neg "quoted"'),
    ("<lora:add_detail:0.5> [cat|dog] AND a tree:0.5", "EasyNegative"),
    ("日本語のプロンプト、桜", "ぼやけた"),
]
ROUND_TRIP_FIELDS = {
    "Steps": 28,
    "Sampler": "DPM++ SDE",
    "Schedule type": "Karras",
    "CFG scale": 11.0,
    "Seed": 4294967294,
    "Size": "512x768",
    "Model hash": "7f96a1a9ca",
    "Model": "model, with: odd name",
    "VAE": "vae-ft-mse-840000-ema-pruned.safetensors",
    "Variation seed": 12,
    "Variation seed strength": 0.3,
    "Denoising strength": 0.4,
    "Clip skip": 2,
    "ENSD": 31337,
    "Hires prompt": 'hires, prompt:\nwith newline and "quotes"',
    "Hires negative prompt": "blurry",
    "Hires upscale": 2.5,
    "Hires steps": 10,
    "Hires upscaler": "Latent (nearest-exact)",
    "Lora hashes": "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef",
    "TI hashes": "EasyNegative: c74b4e810b03",
    "Custom key": "a, b",
    "Version": "v1.10.1",
}


@pytest.mark.parametrize(("prompt", "negative"), ROUND_TRIP_PROMPTS)
def test_parse_reads_back_what_format_writes(prompt: str, negative: str) -> None:
    parsed = parse_infotext(format_infotext(prompt, negative, ROUND_TRIP_FIELDS))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    for key, value in ROUND_TRIP_FIELDS.items():
        if key == "Size":
            assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
        else:
            assert parsed[key] == str(value), key


@pytest.mark.parametrize("cfg", [7, 7.0, 7.5, 0.1 + 0.2])
def test_numbers_read_back_as_the_strings_written(cfg: float) -> None:
    parsed = parse_infotext(format_infotext("p", "", {"Steps": 20, "CFG scale": cfg, "Seed": -1}))
    assert parsed["CFG scale"] == str(cfg) and float(parsed["CFG scale"]) == cfg


def test_a_written_infotext_reads_back_and_writes_again_identically() -> None:
    parsed = parse_infotext(HIRES_LORA_INFOTEXT)
    skip = {"Prompt", "Negative prompt", "Size-1", "Size-2"}
    present = [key for key in INFOTEXT_KEY_ORDER if f"{key}: " in HIRES_LORA_INFOTEXT and key not in skip]
    fields = {key: parsed[key] for key in present if key != "Size"}
    fields["Size"] = f"{parsed['Size-1']}x{parsed['Size-2']}"
    again = format_infotext(str(parsed["Prompt"]), str(parsed["Negative prompt"]), fields)
    assert again == HIRES_LORA_INFOTEXT
