"""The `renderfarm` command line, built on the client; it needs the ``cli`` extra (rich)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """The console script: says which extra to install when rich is missing, instead of a traceback."""
    try:
        from renderfarm_client.cli.main import main as run
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "rich":
            raise
        print("renderfarm: the command line needs rich: pip install 'renderfarm-client[cli]'", file=sys.stderr)
        return 2
    return run(argv)
