"""`covidseg admin ...`: administrators of the job dashboard (/admin).

    covidseg admin create NAME            # asks for the password twice (or reads one line with --password-stdin)
    covidseg admin reset-password NAME    # new password; ends the admin's open sessions
    covidseg admin disable NAME           # the admin can no longer log in; ends open sessions
    covidseg admin list

Passwords are hashed with scrypt (shared.service.admin_users); they are never accepted as a command-line argument (they
would land in the shell history and in `ps`). The database is COVIDSEG_DATABASE_URL (or --database-url); its
schema comes from `make migrate`. Bad input (existing or unknown name, short password) -> `error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import getpass
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("admin", help="manage administrators of the web dashboard (/admin)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: COVIDSEG_DATABASE_URL)")
    sub = p.add_subparsers(dest="admin_command", metavar="{create,reset-password,disable,list}")
    sub.required = True
    for name, helptext in (("create", "create an administrator"),
                           ("reset-password", "set a new password (ends the admin's sessions)")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("username")
        c.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input (scripts)")
        c.set_defaults(func=_cmd_create if name == "create" else _cmd_reset)
    d = sub.add_parser("disable", help="disable an administrator (ends the admin's sessions)")
    d.add_argument("username")
    d.set_defaults(func=_cmd_disable)
    ls = sub.add_parser("list", help="list administrators")
    ls.set_defaults(func=_cmd_list)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _session_factory(args):
    from shared.service.db import make_engine, make_sessionmaker
    from shared.service.settings import Settings
    url = getattr(args, "database_url", None) or Settings.from_env().database_url
    return make_sessionmaker(make_engine(url))


def _error(message: str):
    from cli import CLIError
    return CLIError(message)


def _read_password(args) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise _error("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password (again): ")
    if first != second:
        raise _error("the passwords differ")
    return first


def _save(args, replace: bool) -> int:
    from shared.service.admin_users import AdminError, create_admin
    password = _read_password(args)
    S = _session_factory(args)
    try:
        with S() as session:
            user = create_admin(session, args.username, password, replace_password=replace)
            session.commit()
    except AdminError as exc:
        raise _error(str(exc)) from None
    print(f"admin {user.username!r} {'password changed' if replace else 'created'}")
    return 0


def _cmd_create(args) -> int:
    from shared.service.admin_users import get_user
    with _session_factory(args)() as session:
        if get_user(session, args.username) is not None:
            raise _error(f"admin {args.username!r} already exists (use `covidseg admin reset-password`)")
    return _save(args, replace=False)


def _cmd_reset(args) -> int:
    from shared.service.admin_users import get_user
    with _session_factory(args)() as session:
        if get_user(session, args.username) is None:
            raise _error(f"no admin {args.username!r}")
    return _save(args, replace=True)


def _cmd_disable(args) -> int:
    from shared.service.admin_users import disable_admin
    with _session_factory(args)() as session:
        ok = disable_admin(session, args.username)
        session.commit()
    if not ok:
        raise _error(f"no admin {args.username!r}")
    print(f"admin {args.username!r} disabled")
    return 0


def _cmd_list(args) -> int:
    from sqlalchemy import select
    from shared.service.admin_users import AdminUser
    with _session_factory(args)() as session:
        rows = session.scalars(select(AdminUser).order_by(AdminUser.username)).all()
    for u in rows:
        state = "disabled" if u.disabled_at else "active"
        last = u.last_login_at.isoformat(timespec="seconds") if u.last_login_at else "never"
        print(f"{u.username}\t{state}\tlast login: {last}")
    return 0


def main(argv=None) -> int:
    """`python -m cli.admin ...` == `covidseg admin ...` (same parser and error handling)."""
    from cli import main as cli_main
    return cli_main(["admin", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
