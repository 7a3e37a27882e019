"""The WebUI's infotext: the "parameters" text stored in every image, written and read back.

Users paste infotexts between the WebUI, image sites and this farm, and the WebUI reads ours back
from our PNGs, so the text has to be byte-for-byte what the WebUI writes (``create_infotext`` in
``modules/processing.py``) and has to be read the way the WebUI reads it
(``parse_generation_parameters`` in ``modules/infotext_utils.py``), defaults included.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

from shared.webui.prompts import parse_prompt_attention

__all__ = ["INFOTEXT_KEY_ORDER", "format_infotext", "parse_infotext", "quote", "unquote"]

# The order create_infotext writes: its fixed keys, then p.extra_generation_params in the order the
# WebUI's code inserts them (hires fix in txt2img init, inpainting in img2img init, LoRA and
# embedding hashes while the batch runs, sampler details during sampling), then Version.
INFOTEXT_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
    # extra_generation_params, as the WebUI inserts them
    "Hires checkpoint",
    "Hires sampler",
    "Hires prompt",
    "Hires negative prompt",
    "Hires schedule type",
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Mask mode",
    "Mask blur",
    "Inpaint area",
    "Masked area padding",
    "Masked content",
    # the ControlNet extension's units, added in its process() before extra networks activate
    *(f"ControlNet {i}" for i in range(8)),
    "Lora hashes",
    "TI hashes",
    "Emphasis",
    "Noise multiplier",
    "Schedule max sigma",
    "Schedule min sigma",
    "Schedule rho",
    "Version",
)
_RANK = {key: rank for rank, key in enumerate(INFOTEXT_KEY_ORDER)}


def quote(value: str) -> str:
    """JSON-quote a value holding ``,`` ``:`` or a newline, which would otherwise break the line."""
    if "," not in value and ":" not in value and "\n" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def unquote(value: str) -> str:
    """Undo :func:`quote`; a value that only looks quoted is returned unchanged."""
    if len(value) < 1 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if isinstance(decoded, str) else value


def _is_quoted(value: str) -> bool:
    return len(value) >= 2 and unquote(value) != value


def _ordered_keys(fields: Mapping[str, object]) -> list[str]:
    known = sorted((key for key in fields if key in _RANK and key != "Version"), key=_RANK.__getitem__)
    unknown = [key for key in fields if key not in _RANK]
    return known + unknown + (["Version"] if "Version" in fields else [])


def _clip_skip_written(value: object) -> bool:
    try:
        return int(str(value)) > 1
    except ValueError:
        return True


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The WebUI's infotext for one image.

    ``fields`` maps infotext keys to values in any order; they are written in the WebUI's order
    (:data:`INFOTEXT_KEY_ORDER`, then unknown keys as given, then Version). None and "" are left
    out, as is a Clip skip of 1 or less. Values are written with ``str()``, so a float CFG scale of
    7.0 is "7.0" as the WebUI writes it for API requests. An already-quoted value is not quoted
    twice. Like the WebUI, a pair whose value equals its key is written as the key alone.
    """
    pairs = []
    for key in _ordered_keys(fields):
        value = fields[key]
        if value is None or value == "" or (key == "Clip skip" and not _clip_skip_written(value)):
            continue
        text = str(value)
        if text == key:
            pairs.append(key)
        else:
            pairs.append(f"{key}: {text if _is_quoted(text) else quote(text)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(pairs)}".strip()


_PARAM = re.compile(
    r"""
    \s*(?P<key>\w[\w \-/]+):\s*             # key: a word character, then words, spaces, - or /
    (?P<value>"(?:\\.|[^\\"])+"|[^,]*)       # a JSON-quoted value, or anything up to the next comma
    (?:,|$)
    """,
    re.VERBOSE,
)
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")
_SCHEDULE_TYPES = (  # (name, label, aliases) in the WebUI's order: modules/sd_schedulers.py
    ("automatic", "Automatic", ()),
    ("uniform", "Uniform", ()),
    ("karras", "Karras", ()),
    ("exponential", "Exponential", ()),
    ("polyexponential", "Polyexponential", ()),
    ("sgm_uniform", "SGM Uniform", ("SGMUniform",)),
    ("kl_optimal", "KL Optimal", ()),
    ("align_your_steps", "Align Your Steps", ()),
    ("simple", "Simple", ()),
    ("normal", "Normal", ()),
    ("ddim", "DDIM", ()),
    ("beta", "Beta", ()),
)
# What parse_generation_parameters fills in for a key the infotext lacks. Values keep the WebUI's
# types: 0 and 32 are ints there too.
_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", 32),
)
_LATE_DEFAULTS: tuple[tuple[str, object], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", 0),
    ("Schedule min sigma", 0),
    ("Schedule rho", 0),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def parse_infotext(text: str) -> dict[str, object]:
    """Read an infotext the way the WebUI's ``parse_generation_parameters`` does.

    Returns "Prompt", "Negative prompt" and every key of the last line, unquoted, as strings; a
    ``WxH`` value becomes "<key>-1" and "<key>-2" (so "Size" gives "Size-1" and "Size-2"). The last
    line holds the parameters only if it has at least three ``key: value`` pairs. Keys the text lacks
    get the WebUI's defaults (Clip skip "1", Schedule type "Automatic", RNG "GPU", ...). A legacy
    sampler such as "DPM++ 2M Karras" without a Schedule type is split into "DPM++ 2M" and "Karras".
    """
    *lines, last_line = text.strip().split("\n")
    if len(_PARAM.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""

    prompt = negative_prompt = ""
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        if in_negative:  # like the WebUI, an empty first line adds no newline
            negative_prompt += ("\n" if negative_prompt else "") + line
        else:
            prompt += ("\n" if prompt else "") + line

    res: dict[str, object] = {}
    for match in _PARAM.finditer(last_line):
        key, value = match.group("key"), match.group("value")
        if not value:
            continue  # the WebUI fails on an empty value and skips the key
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _IMAGE_SIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    res.setdefault("Clip skip", "1")
    if "Hypernet" in res:
        res["Prompt"] = f"{prompt}<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"], res["Hires resize-2"] = 0, 0
    _split_legacy_sampler(res, "Sampler", "Schedule type")
    _split_legacy_sampler(res, "Hires sampler", "Hires schedule type")
    for key, default in _DEFAULTS:
        res.setdefault(key, default)
    _restore_old_hires_fix(res)
    for key, default in _LATE_DEFAULTS:
        res.setdefault(key, default)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    if "Emphasis" not in res and _uses_emphasis(prompt, negative_prompt):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    _backcompat(res)
    return res


def _uses_emphasis(prompt: str, negative_prompt: str) -> bool:
    try:
        attention = parse_prompt_attention(prompt) + parse_prompt_attention(negative_prompt)
    except ValueError:
        return False  # "(a:1.2.3)": the WebUI fails here; reading the text should not
    return any(weight != 1.0 and part != "BREAK" for part, weight in attention)


def _split_legacy_sampler(res: dict[str, object], sampler_key: str, schedule_key: str) -> None:
    """Before 1.9 the WebUI wrote the schedule into the sampler name: "DPM++ 2M Karras".

    Mirrors ``sd_samplers.get_sampler_and_scheduler``: every schedule type is tried in order, by
    label, name and alias, and each one found is cut off the end of the name. The WebUI then maps a
    schedule equal to the sampler's default to "Automatic"; this keeps the explicit label instead,
    which renders the same and needs no sampler table.
    """
    name = res.get(sampler_key)
    if schedule_key in res or not isinstance(name, str):
        return
    found = None
    for schedule_name, label, aliases in _SCHEDULE_TYPES:
        for option in (label, schedule_name, *aliases):
            if name.endswith(" " + option):
                found, name = label, name[: -len(option) - 1]
                break
    if found is not None:
        res[sampler_key], res[schedule_key] = name, found


def _restore_old_hires_fix(res: dict[str, object]) -> None:
    """Infotexts from before 1.0 give the first pass size and the final size; convert to hr size."""
    first_width, first_height = res.get("First pass size-1"), res.get("First pass size-2")
    if first_width is None or first_height is None:
        return
    width, height = int(str(res.get("Size-1", 512))), int(str(res.get("Size-2", 512)))
    first_width, first_height = int(str(first_width)), int(str(first_height))
    if first_width == 0 or first_height == 0:
        scale = math.sqrt(512 * 512 / (width * height))
        first_width = math.ceil(scale * width / 64) * 64
        first_height = math.ceil(scale * height / 64) * 64
    res["Size-1"], res["Size-2"] = first_width, first_height
    res["Hires resize-1"], res["Hires resize-2"] = width, height


# --------------------------------------------------------------------------------------------------
# Version-dependent flags (modules/infotext_versions.py). The WebUI compares with packaging.version;
# this is the subset of PEP 440 its own version strings use ("v1.7.0-225", "1.6.0-RC", "v1.10.1").
# --------------------------------------------------------------------------------------------------

_PEP440 = re.compile(
    r"""^v?(?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre>alpha|beta|preview|pre|rc|a|b|c)[-_.]?(?P<pre_n>\d+)?)?
    (?:-(?P<post_implicit>\d+)|[-_.]?(?P<post>post|rev|r)[-_.]?(?P<post_n>\d+)?)?
    (?:[-_.]?(?P<dev>dev)[-_.]?(?P<dev_n>\d+)?)?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_RANK = {"alpha": 0, "a": 0, "beta": 1, "b": 1, "preview": 2, "pre": 2, "rc": 2, "c": 2}


def _version_key(text: str) -> tuple | None:
    """A key that sorts versions as packaging.version.Version does; None for a non-version."""
    match = _PEP440.match(text.strip())
    if match is None:
        return None
    release = tuple(int(part) for part in match["release"].split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    has_post = match["post_implicit"] is not None or match["post"] is not None
    if match["pre"]:
        pre = (_PRE_RANK[match["pre"].lower()], int(match["pre_n"] or 0))
    elif match["dev"] and not has_post:
        pre = (-1, 0)  # 1.0.dev0 sorts before 1.0a0
    else:
        pre = (3, 0)
    post = int(match["post_implicit"] or match["post_n"] or 0) if has_post else -1
    dev = int(match["dev_n"] or 0) if match["dev"] else math.inf
    return release, pre, post, dev


def _webui_version(text: object) -> tuple | None:
    if not isinstance(text, str):
        return None
    match = re.match(r"([^-]+-[^-]+)-.*", text)  # "v1.7.0-225-gabc1234" -> "v1.7.0-225"
    return _version_key(match.group(1) if match else text)


def _older(version: tuple, than: str) -> bool:
    reference = _version_key(than)
    assert reference is not None
    return version < reference


def _backcompat(res: dict[str, object]) -> None:
    version = _webui_version(res.get("Version"))
    if version is None:
        return
    if _older(version, "1.6.0") and "[" in str(res.get("Prompt", "")):
        res["Old prompt editing timelines"] = True
    if _older(version, "1.6.0") and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if _older(version, "1.7.0-225"):
        res["Downcast alphas_cumprod"] = True
    if _older(version, "1.8.0") and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True
