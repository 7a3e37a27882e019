"""The studio's infotext reader (api/studio_page/infotext.js) reads what shared/webui/infotext.py reads.

"Paste infotext" parses in the browser (the png-info route takes images only); every key the JavaScript
returns must hold what the Python parser, the WebUI's reading, gives for it. Runs the module with Node.js.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.webui.infotext import format_infotext, parse_infotext

MODULE = Path(__file__).resolve().parents[2] / "api" / "studio_page" / "infotext.js"
NODE = shutil.which("node")

INFOTEXTS = [
    # The users' reference infotext (shared/webui-reference.md).
    "1girl, solo\nNegative prompt: lowres\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 1363903108, Size: 512x512, Model hash: 7f96a1a9ca, Model: AnythingV5V3_v5PrtRE, Clip skip: 2, "
    "ENSD: 31337, Version: v1.10.1",
    # Before 1.9 the schedule rode in the sampler's name.
    "a cat\nSteps: 13, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1960455555, Size: 507x676, Model: x",
    "a cat\nSteps: 13, Sampler: DPM++ SDE sgm_uniform, CFG scale: 7, Seed: 1, Size: 64x64",
    # Multi-line prompts, quoted values holding commas and colons, hires fix.
    "line one,\nline two (x:1.2)\nNegative prompt: bad,\nworse\nSteps: 30, Sampler: Euler a, CFG scale: 11, "
    "Seed: 7, Size: 512x768, Denoising strength: 0.4, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, "
    'Lora hashes: "name: 0123456789ab, other: ba9876543210", '
    'ControlNet 0: "Module: canny, Model: demo [12345678], Weight: 0.8"',
    # No parameters line: all of it is prompt; and a last line with too few pairs is prompt too.
    "just a prompt, with: a colon",
    "a prompt\nSteps: 5, Seed: 3",
    # Written by the farm's own formatter.
    format_infotext("a lighthouse", "fog", {"Steps": 7, "Sampler": "Euler", "Schedule type": "Karras",
                                            "CFG scale": 6.5, "Seed": 1234, "Size": "320x192", "Model": "demo-tiny",
                                            "Hires prompt": "with, comma: and colon"}),
]


@pytest.mark.skipif(NODE is None, reason="Node.js is not installed")
def test_the_javascript_reader_agrees_with_the_python_one() -> None:
    script = (f"import {{ parseInfotext }} from {json.dumps(MODULE.as_uri())};\n"
              f"const texts = {json.dumps(INFOTEXTS)};\n"
              "console.log(JSON.stringify(texts.map(parseInfotext)));")
    done = subprocess.run([str(NODE), "--input-type=module", "-e", script], capture_output=True, text=True,
                          timeout=60, check=True)
    for text, from_js in zip(INFOTEXTS, json.loads(done.stdout), strict=True):
        expected = parse_infotext(text)
        assert {key: str(expected.get(key)) for key in from_js} == from_js, text
        # It reads every key of the parameters line, not a subset.
        assert {key for key, value in expected.items() if isinstance(value, str)} - set(from_js) <= _ADDED_BY_PYTHON


# Keys the Python reader adds itself (the WebUI's defaults, and Emphasis from the prompt's weights), which the page
# has no field for.
_ADDED_BY_PYTHON = {"Emphasis", "Hires sampler", "Hires schedule type", "Hires checkpoint", "Hires prompt",
                    "Hires negative prompt", "Mask mode", "Masked content", "Inpaint area", "RNG", "VAE Encoder",
                    "VAE Decoder", "FP8 weight"}
