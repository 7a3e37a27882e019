"""`renderfarm`: generate images, follow and cancel jobs, read a PNG's parameters, build prompts."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

import httpx
from rich.console import Console

from renderfarm_client import Client, RenderfarmError
from renderfarm_client.cli import commands, prompt_choices
from renderfarm_client.cli.exit_codes import EXIT_CODES_HELP, ExitCode, exit_code_for
from renderfarm_client.errors import ApiError, describe_detail
from renderfarm_client.pnginfo import NotAPng

# `make up`'s operator commands live in the farm's own package; in a checkout of the farm they share this name.
OPERATOR_COMMANDS = ("up", "create-key", "migrate", "owners")
EPILOG = f"""environment:
  RENDERFARM_URL       the farm (default http://127.0.0.1:7861); --url wins
  RENDERFARM_API_KEY   your API key; --key wins

{EXIT_CODES_HELP}
operator commands (where the farm itself is installed): {", ".join(OPERATOR_COMMANDS)}
"""
Command = Callable[[argparse.Namespace, Any, Console, Console], ExitCode]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the farm's URL (default: $RENDERFARM_URL or http://127.0.0.1:7861)")
    common.add_argument("--key", help="API key (default: $RENDERFARM_API_KEY)")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("-o", "--output", metavar="DIR", help="write the job's images into DIR")
    waiting.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 5)")
    waiting.add_argument("--json", action="store_true", help="print the finished job as JSON")

    parser = argparse.ArgumentParser(prog="renderfarm", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, command: Command, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents],
                                    epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub_parser.set_defaults(run=command)
        return sub_parser

    gen = add("generate", commands.generate, "render a prompt with a progress bar; -o DIR writes the images", waiting)
    gen.add_argument("prompt", nargs="?", help="the prompt, with the WebUI's syntax ((word:1.2), <lora:name:1>, ...)")
    gen.add_argument("-n", "--negative-prompt", "--negative")
    gen.add_argument("-m", "--model", help="checkpoint name (renderfarm models lists them)")
    gen.add_argument("-s", "--seed", type=int, help="-1 or left out: random (recorded on the job)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("-W", "--width", type=int)
    gen.add_argument("-H", "--height", type=int)
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--sampler", dest="sampler_name", help='e.g. "Euler a", "DPM++ 2M"')
    gen.add_argument("--scheduler", help="schedule type, e.g. Karras")
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--n-iter", type=int, help="batch count")
    gen.add_argument("--init-image", action="append", metavar="FILE", help="img2img: uploaded, then used")
    gen.add_argument("--denoising-strength", type=float)
    gen.add_argument("--lora", action="append", metavar="NAME[:WEIGHT]")
    gen.add_argument("--style", action="append", dest="styles", metavar="NAME")
    gen.add_argument("--set", action="append", metavar="FIELD=JSON", help="any other job field, e.g. enable_hr=true")
    gen.add_argument("--no-wait", action="store_true", help="print the job id and exit")

    watch = add("watch", commands.watch, "follow a job until it ends (its progress bar); -o DIR writes its images",
                waiting)
    watch.add_argument("job_id")
    listing = add("jobs", commands.jobs, "list my jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--json", action="store_true")
    cancel = add("cancel", commands.cancel, "cancel a job (a running one stops at its next step)")
    cancel.add_argument("job_id")
    png = add("png-info", commands.png_info, "print a PNG's generation parameters (read locally, no farm needed)")
    png.add_argument("file")
    png.add_argument("--json", action="store_true", help="every text chunk as JSON")
    prompt_choices.add_arguments(add("build-prompt", commands.build_prompt,
                                     "build a prompt from the farm's prompt dictionary"))
    add("models", commands.models, "list the checkpoints and LoRAs the farm has")
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list and args_list[0] in OPERATOR_COMMANDS:
        return _operator_command(args_list)
    args = build_parser().parse_args(args_list)
    out, err = Console(soft_wrap=True), Console(stderr=True, soft_wrap=True)  # a message stays one line
    try:
        if args.command == "png-info":
            return commands.png_info(args, None, out, err)
        with Client(args.url, args.key) as client:
            return int(args.run(args, client, out, err))
    except KeyboardInterrupt:
        err.print("interrupted")
        return ExitCode.INTERRUPTED
    except ApiError as exc:
        err.print(f"[red]error[/red] {exc.status_code}: {describe_detail(exc.detail)}", highlight=False)
        return exit_code_for(exc)
    except (RenderfarmError, OSError, NotAPng, ValueError, httpx.InvalidURL) as exc:
        err.print(f"[red]error[/red] {exc}", highlight=False, markup=False)
        return exit_code_for(exc) if not isinstance(exc, httpx.InvalidURL) else ExitCode.USAGE


def _operator_command(argv: list[str]) -> int:
    try:
        farm_cli = importlib.import_module("devtools.cli")  # the farm's package, not a dependency of this one
    except ImportError:
        print(f"renderfarm {argv[0]}: an operator command; run `renderfarm-admin {argv[0]}` where the farm itself "
              "is installed", file=sys.stderr)
        return ExitCode.USAGE
    return int(farm_cli.main(argv))


if __name__ == "__main__":
    sys.exit(main())
