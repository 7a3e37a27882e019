"""A rich progress bar that follows a job: its queue position, then its denoising steps, then the outcome."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from renderfarm_client.models import Job


def describe(job: Job) -> str:
    if job.status == "queued":
        return f"queued (position {job.queue_position})" if job.queue_position else "queued"
    if job.status == "running":
        eta = f", about {job.eta_seconds:.0f} s left" if job.eta_seconds is not None else ""
        return f"rendering{eta}"
    if job.error is not None:
        return f"{job.status}: {job.error.message}"
    return job.status


class JobProgress:
    """``with JobProgress(console, job_id) as bar: client.wait(job_id, on_progress=bar.update)``."""

    def __init__(self, console: Console, job_id: str) -> None:
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.fields[job]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("steps"), TimeElapsedColumn(), TextColumn("{task.description}"),
            console=console, transient=False,
        )
        self._task: TaskID = self._progress.add_task("submitted", total=None, job=job_id[:8])

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, job: Job) -> None:
        total = job.total_steps or None
        completed = job.total_steps if job.status == "succeeded" and job.total_steps else job.current_step
        self._progress.update(self._task, total=total, completed=completed, description=describe(job))
