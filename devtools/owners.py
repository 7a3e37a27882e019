"""`renderfarm-admin owners ...`: owners' limits and usage straight from Postgres (like `create-key`), for an operator
without the API or an admin key at hand. `/v1/admin/owners` does the same over HTTP."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.clock import utcnow
from shared.db.models import OwnerPolicy
from shared.owners.changes import PolicyUpdate, reset_policy, write_policy
from shared.owners.policy import POLICY_FIELDS, EffectivePolicy, resolve, row_values
from shared.owners.usage import Used, known_owners, used_by_owner
from shared.settings import Settings

DEFAULT = "default"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    owners = sub.add_parser("owners", help="list owners' limits and usage, set or reset an owner's policy")
    actions = owners.add_subparsers(dest="owners_command", required=True)
    actions.add_parser("list", help="every owner with a key or a policy: its limits and today's/this month's use")
    change = actions.add_parser("set", help="set fields of an owner's policy (the others keep their values)")
    change.add_argument("owner")
    for name in POLICY_FIELDS:
        change.add_argument(_flag(name), dest=name, metavar="VALUE",
                            help=f"'{DEFAULT}' puts it back to the settings default")
    reset = actions.add_parser("reset", help="put every field of an owner's policy back to the defaults")
    reset.add_argument("owner")


def run(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    if args.owners_command == "list":
        print(owner_table(session, settings))
        return 0
    if args.owners_command == "reset":
        had_policy = reset_policy(session, args.owner)
        print(f"{args.owner}: every limit is the default now" + ("" if had_policy else " (it had no policy)"))
        return 0
    return set_fields(session, settings, args)


def set_fields(session: Session, settings: Settings, args: argparse.Namespace) -> int:
    given = {name: getattr(args, name) for name in POLICY_FIELDS if getattr(args, name) is not None}
    if not given:
        print("nothing to set: give at least one of " + ", ".join(map(_flag, POLICY_FIELDS)), file=sys.stderr)
        return 2
    try:
        update = PolicyUpdate.model_validate(  # command-line text: numbers arrive as strings
            {name: None if value == DEFAULT else value for name, value in given.items()}, strict=False)
    except ValidationError as error:
        for problem in error.errors():
            print(f"{_flag(str(problem['loc'][0]))}: {problem['msg']} (got {problem.get('input')!r})",
                  file=sys.stderr)
        return 2
    if refused := update.priority_error(settings.fair_share):
        print(f"--max-priority: {refused}", file=sys.stderr)
        return 2
    write_policy(session, args.owner, update.changes())
    print(f"{args.owner}: " + ", ".join(f"{name}={DEFAULT if value is None else value}"
                                         for name, value in update.changes().items()))
    return 0


def _cells(policy: EffectivePolicy, today: Used, month: Used) -> tuple[str, ...]:
    def shown(name: str) -> str:
        value = getattr(policy, name)
        return f"{value:g}{'*' if name in policy.overrides else ''}"

    return (policy.owner, shown("weight"), shown("max_running"), shown("max_queued"),
            f"{shown('rate_burst')}+{shown('rate_per_second')}/s",
            f"{shown('gpu_seconds_per_day')}s {shown('images_per_day')}img",
            f"{shown('gpu_seconds_per_month')}s {shown('images_per_month')}img",
            f"{today.gpu_seconds:.1f}s {today.images}img", f"{month.gpu_seconds:.1f}s {month.images}img")


def owner_table(session: Session, settings: Settings) -> str:
    """One line per owner: its limits (0: none; * marks what an admin set) and its use today and this month."""
    used = used_by_owner(session, utcnow())
    rows = {row.owner: row_values(row) for row in session.scalars(select(OwnerPolicy))}
    lines: list[tuple[str, ...]] = [("owner", "weight", "max_running", "max_queued", "rate", "quotas/day",
                                     "quotas/month", "today", "month")]
    for owner in known_owners(session):
        lines.append(_cells(resolve(owner, rows.get(owner), settings.fair_share),
                            *used.get(owner, (Used(), Used()))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
