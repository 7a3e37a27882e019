"""How many seconds of rendering the queue holds: the arithmetic behind `renderfarm_queued_work_seconds`.

An autoscaler wants work, not a job count: one queued 150-step hires job is worth thirty 4-step
previews. Queued work for a model is its queued jobs' planned sampling steps (`planned_steps`,
the count the job view shows) times that model's seconds per step.

Seconds per step come from the model's recent succeeded jobs: each job's `render_seconds` (its
share of its batch's render time) and planned steps are folded into two decayed sums, so the
estimate follows the last ~20 jobs (a new GPU type, a bigger batch size) without keeping them,
and it survives an idle night: history decays per job finished, not per hour. The ratio of the
sums weighs a job by its steps, so a 2-step probe cannot swing the estimate. A model that never
finished a job uses `DEFAULT_SECONDS_PER_STEP`.

Pure functions: `api.admin.metrics_rollup` folds finished jobs in, `api.admin.autoscaling` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# DEFAULT_SECONDS_PER_STEP: a guess for a model with no finished job yet (about 4 steps a second on a mid-range
# GPU), shared with the queued job's ETA in the job view.
from shared.jobs.views import DEFAULT_SECONDS_PER_STEP, planned_steps

# Weight kept by the history at each finished job: 0.95 gives the last ~20 jobs (1 / (1 - 0.95)) most say.
HISTORY_DECAY = 0.95
# metric_counters names holding the decayed sums (model column = checkpoint, key = "").
SECONDS_COUNTER = "recent_render_seconds"
STEPS_COUNTER = "recent_render_steps"
# The params that decide a job's planned steps, as one JSON object (nulls dropped), for SQL over `jobs j`.
PLAN_SQL = ("jsonb_strip_nulls(jsonb_build_object('mode', j.params->'mode', 'steps', j.params->'steps', "
            "'n_iter', j.params->'n_iter', 'denoising_strength', j.params->'denoising_strength', "
            "'enable_hr', j.params->'enable_hr', 'hr_second_pass_steps', j.params->'hr_second_pass_steps'))")


@dataclass(frozen=True)
class RenderHistory:
    """Decayed sums of one model's recent render seconds and planned steps."""

    seconds: float = 0.0
    steps: float = 0.0

    def observe(self, seconds: float, steps: int, decay: float = HISTORY_DECAY) -> RenderHistory:
        return RenderHistory(self.seconds * decay + seconds, self.steps * decay + steps)


@dataclass(frozen=True)
class StepCost:
    seconds_per_step: float
    from_history: bool


def step_cost(history: RenderHistory | None, default: float = DEFAULT_SECONDS_PER_STEP) -> StepCost:
    """A model's seconds per step: its history's ratio, or `default` without one."""
    if history is None or history.steps <= 0 or history.seconds <= 0:
        return StepCost(default, from_history=False)
    return StepCost(history.seconds / history.steps, from_history=True)


def fold(histories: Mapping[str, RenderHistory],
         observations: Iterable[tuple[str, float, int]]) -> dict[str, RenderHistory]:
    """Each model's history after `observations` (model, render seconds, planned steps), oldest first.

    Returns only the models that changed. A job without a measured render time or without steps says
    nothing about the cost of a step and is skipped."""
    changed: dict[str, RenderHistory] = {}
    for model, seconds, steps in observations:
        if seconds <= 0 or steps <= 0:
            continue
        current = changed.get(model) or histories.get(model) or RenderHistory()
        changed[model] = current.observe(seconds, steps)
    return changed


def histories_from_counters(counters: Mapping[tuple[str, str, str], float]) -> dict[str, RenderHistory]:
    """The histories kept in `metric_counters`, as `read_counters` returns them."""
    seconds = {m: v for (n, m, _k), v in counters.items() if n == SECONDS_COUNTER}
    steps = {m: v for (n, m, _k), v in counters.items() if n == STEPS_COUNTER}
    return {m: RenderHistory(seconds.get(m, 0.0), steps.get(m, 0.0)) for m in seconds.keys() | steps.keys()}


def job_steps(plan: Mapping[str, Any] | None) -> int:
    """Planned steps of a job from the few params that decide them; 0 for a job without sampling (upscales)."""
    if not plan or plan.get("steps") is None:
        return 0
    return planned_steps(dict(plan))


def queued_work_seconds(steps_by_model: Mapping[str, int], costs: Mapping[str, StepCost]) -> dict[str, float]:
    """Seconds of rendering each model's queued steps need on one worker."""
    return {model: steps * (costs.get(model) or step_cost(None)).seconds_per_step
            for model, steps in steps_by_model.items()}
