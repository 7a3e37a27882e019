"""Exit codes a script can branch on; `renderfarm --help` and the farm's README list them."""

from __future__ import annotations

from enum import IntEnum

from renderfarm_client.errors import FarmUnreachable, RateLimited, RenderfarmError, ServerError, WaitTimeout


class ExitCode(IntEnum):
    OK = 0
    JOB_FAILED = 1  # the job failed or was canceled
    USAGE = 2  # wrong command line (argparse's own code)
    BAD_INPUT = 3  # the farm refused the request (4xx: a field, the key, no such job) or a local file is unusable
    FARM_UNAVAILABLE = 4  # no answer, a 5xx, or still rate-limited after the retries
    TIMED_OUT = 5  # --timeout ran out before the job finished
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES_HELP = """exit codes:
  0  done (the job succeeded)
  1  the job failed or was canceled
  2  usage error (wrong command line)
  3  bad input: the farm refused the request (4xx: a field named in the message, the key, no such job),
     or a local file could not be read
  4  the farm is unreachable, answered 5xx, or is still rate limiting after the retries
  5  --timeout ran out before the job finished
"""


def exit_code_for(error: RenderfarmError | OSError | ValueError) -> ExitCode:
    """The farm's refusals and unreadable local files (OSError, NotAPng) are bad input."""
    if isinstance(error, WaitTimeout):
        return ExitCode.TIMED_OUT
    if isinstance(error, RateLimited | ServerError | FarmUnreachable):
        return ExitCode.FARM_UNAVAILABLE
    return ExitCode.BAD_INPUT


def exit_code_for_job(status: str) -> ExitCode:
    return ExitCode.OK if status == "succeeded" else ExitCode.JOB_FAILED
