"""What each `renderfarm` subcommand does. Results go to stdout (image paths, prompts, JSON) so scripts can read
them; the progress bar and messages go to stderr."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from renderfarm_client import Client
from renderfarm_client.cli import prompt_choices
from renderfarm_client.cli.exit_codes import ExitCode, exit_code_for_job
from renderfarm_client.cli.progress import JobProgress, describe
from renderfarm_client.pnginfo import read_png_text


def generate(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    fields: dict[str, Any] = {name: getattr(args, name) for name in (
        "negative_prompt", "model", "seed", "steps", "cfg_scale", "sampler_name", "scheduler", "width", "height",
        "batch_size", "n_iter", "denoising_strength", "styles") if getattr(args, name) is not None}
    if args.lora:
        fields["loras"] = [_lora(value) for value in args.lora]
    if args.init_image:
        fields["init_images"] = [client.upload(Path(path)).ref for path in args.init_image]
    for assignment in args.set or []:
        name, _, value = assignment.partition("=")
        fields[name] = json.loads(value)
    job = client.submit(args.prompt, extra_fields=fields)
    err.print(f"job {job.id} submitted")
    if args.no_wait:
        out.print(job.id)
        return ExitCode.OK
    return _follow(client, job.id, args, out, err)


def watch(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    return _follow(client, args.job_id, args, out, err)


def _follow(client: Client, job_id: str, args: argparse.Namespace, out: Console, err: Console) -> ExitCode:
    try:
        with JobProgress(err, job_id) as bar:
            job = client.wait(job_id, on_progress=bar.update, timeout=args.timeout)
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job_id} goes on (renderfarm cancel {job_id} stops it)", highlight=False)
        raise
    if job.status != "succeeded":
        err.print(f"[red]job {job.id} {describe(job)}[/red]")
        return exit_code_for_job(job.status)
    if args.output is not None:
        for path in client.download_images(job, args.output):
            out.print(str(path), highlight=False)
    if args.json:
        out.print_json(data=job.raw)
    return ExitCode.OK


def jobs(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    page = client.jobs(status=args.status, limit=args.limit, offset=args.offset)
    if args.json:
        out.print_json(data={"jobs": [j.raw for j in page.jobs], "total": page.total})
        return ExitCode.OK
    rows = [(job.id, job.status, job.model, str(job.raw.get("created_at", ""))[:19].replace("T", " "),
             f"{job.current_step}/{job.total_steps}", str(len(job.images))) for job in page.jobs]
    if not out.is_terminal:  # piped: one tab-separated line per job, nothing cut short
        for row in rows:
            print("\t".join(row), file=out.file)  # not through rich, which would expand the tabs
        return ExitCode.OK
    table = Table(title=f"{len(rows)} of {page.total} jobs")
    for column in ("id", "status", "model", "created", "steps", "images"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    return ExitCode.OK


def cancel(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    job = client.cancel(args.job_id)
    out.print(f"{job.id} {job.status}", highlight=False)
    return ExitCode.OK


def png_info(args: argparse.Namespace, client: Client | None, out: Console, err: Console) -> ExitCode:
    texts = read_png_text(args.file)
    if args.json:
        out.print_json(data=texts)
        return ExitCode.OK
    if "parameters" not in texts:
        err.print(f"[red]{args.file} has no 'parameters' text chunk[/red] (chunks: {', '.join(texts) or 'none'})")
        return ExitCode.BAD_INPUT
    out.print(texts["parameters"], markup=False, highlight=False)
    return ExitCode.OK


def build_prompt(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    built = client.build_prompt(prompt_choices.choices_from(args), seed=args.seed)
    if args.json:
        out.print_json(data=built.raw)
        return ExitCode.OK
    out.print(built.prompt, markup=False, highlight=False)
    if built.negative_prompt:
        out.print(f"Negative prompt: {built.negative_prompt}", markup=False, highlight=False)
    for warning in built.warnings:  # on stderr: the prompt on stdout stays pipeable
        err.print(f"warning: {warning}", markup=False, highlight=False)
    return ExitCode.OK


def models(args: argparse.Namespace, client: Client, out: Console, err: Console) -> ExitCode:
    for model in client.models():
        marks = " (default)" if model.default else "" if model.loadable else " (refused)"
        out.print(f"{model.name}{marks}", highlight=False)
    for lora in client.loras():
        out.print(f"<lora:{lora.name}:1>{' (refused)' if lora.refused_reason else ''}", highlight=False)
    return ExitCode.OK


def _lora(value: str) -> dict[str, Any]:
    name, _, weight = value.rpartition(":") if ":" in value else (value, "", "1")
    return {"name": name, "weight": float(weight or 1)}

