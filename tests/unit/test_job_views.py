"""What a job view promises before the job runs: the steps it will take, counted as the WebUI counts them."""

from __future__ import annotations

import pytest

from shared.jobs.views import planned_steps


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"mode": "txt2img", "steps": 20}, 20),
        ({"mode": "txt2img", "steps": 20, "n_iter": 3}, 60),
        ({"mode": "txt2img", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 0}, 40),
        ({"mode": "txt2img", "steps": 20, "enable_hr": True, "hr_second_pass_steps": 7, "n_iter": 2}, 54),
        ({"mode": "txt2img", "steps": 20, "enable_hr": False, "hr_second_pass_steps": 7}, 20),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 0.75}, 16),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 1.0}, 20),
        ({"mode": "img2img", "steps": 20, "denoising_strength": 0.0}, 1),
    ],
)
def test_planned_steps(params: dict, expected: int) -> None:
    assert planned_steps(params) == expected
