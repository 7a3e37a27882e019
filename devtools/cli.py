"""`renderfarm-admin` command line: run the farm, create API keys, migrate, owners' limits, the model store."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="renderfarm")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole farm in the foreground (embedded servers unless configured)")
    key = sub.add_parser("create-key", help="create an API key and print it (shown once)")
    key.add_argument("--owner", required=True, help="who the key's jobs belong to")
    key.add_argument("--name", default="", help="a label for the key")
    key.add_argument("--admin", action="store_true", help="allow admin routes")
    key.add_argument("--models", action="store_true", help="allow adding, renaming and deleting model store files")
    sub.add_parser("migrate", help="apply database migrations")
    models = sub.add_parser("models", help="the shared model store")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    register = models_sub.add_parser("register", help="register the models folder's files in the store's registry")
    register.add_argument("--upload", action="store_true", help="also upload them, so workers on other machines "
                                                                 "can pull them")
    from devtools import owners

    owners.add_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "up":
        from devtools.launcher import up

        return up()
    from shared.settings import get_settings

    if args.command == "migrate":
        from shared.db.migrate import upgrade

        upgrade(get_settings().services.database_url)
        return 0
    if args.command == "create-key":
        from shared.auth import create_api_key
        from shared.db.session import session_scope

        with session_scope() as session:
            row, plaintext = create_api_key(session, args.owner, is_admin=args.admin, name=args.name,
                                            can_manage_models=args.models)
        print(plaintext)
        print(f"created key {row.key_prefix}... for owner {args.owner!r}{' (admin)' if args.admin else ''}",
              file=sys.stderr)
        return 0
    if args.command == "models":
        from shared.db.session import get_session_factory
        from shared.models.store_files import register_folder
        from shared.storage.object_store import get_object_store

        settings = get_settings()
        counts = register_folder(get_session_factory(), settings.models.models_dir,
                                 get_object_store() if args.upload else None)
        print(f"{counts['registered']} files registered{' and uploaded' if args.upload else ''}, "
              f"{counts['skipped']} skipped (see the log)")
        return 0
    if args.command == "owners":
        from shared.db.session import session_scope

        with session_scope() as session:
            return owners.run(session, get_settings(), args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
