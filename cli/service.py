"""`covidseg token ...` and `covidseg service ...`: API tokens and job-service operations.

    covidseg token create --name NAME [--scopes read,submit] [--expires-in-days N]
                                          # prints a new bearer token once (only its SHA-256 is stored)
    covidseg token list
    covidseg token revoke ID|PREFIX       # refused within COVIDSEG_TOKEN_CACHE_SECONDS on every API process
    covidseg service migrate              # alembic upgrade head (same as `make migrate`)
    covidseg service sweep                # re-queue stuck jobs / re-publish lost messages now
    covidseg service settings             # the effective settings (secrets masked)
    covidseg service backup --out DIR     # database + bucket into DIR; `restore --from DIR` (cli/backup.py)

The database is COVIDSEG_DATABASE_URL (or --database-url); its schema comes from `make migrate`.
Also runnable as `python -m cli.service ...`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    t = subparsers.add_parser("token", help="manage API bearer tokens", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: COVIDSEG_DATABASE_URL)")
    tsub = t.add_subparsers(dest="token_command", metavar="{create,list,revoke}")
    tsub.required = True
    c = tsub.add_parser("create", help="create a token and print it (shown once)")
    c.add_argument("--name", required=True, help="who or what uses the token")
    c.add_argument("--scopes", default="read,submit",
                   help="what the token may do: read (GET its jobs and studies), submit (create, cancel, retry), "
                        "admin (the admin API, every token's work); comma-separated (default read,submit)")
    c.add_argument("--expires-in-days", type=_positive_days, default=None,
                   help="the token stops working after this many days (default: never)")
    c.add_argument("--quiet", action="store_true", help="print only the token")
    c.set_defaults(func=_token_create)
    ls = tsub.add_parser("list", help="list tokens (prefixes only)")
    ls.set_defaults(func=_token_list)
    rv = tsub.add_parser("revoke", help="revoke a token by id or prefix")
    rv.add_argument("token")
    rv.set_defaults(func=_token_revoke)
    t.set_defaults(func=lambda args: (t.print_help(), 2)[1])

    s = subparsers.add_parser("service", help="job service operations (migrate, sweep, settings, backup, restore)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: COVIDSEG_DATABASE_URL)")
    ssub = s.add_subparsers(dest="service_command", metavar="{migrate,sweep,settings,backup,restore}")
    ssub.required = True
    ssub.add_parser("migrate", help="create/upgrade the schema (alembic upgrade head)").set_defaults(func=_migrate)
    ssub.add_parser("sweep", help="run the recovery sweep once").set_defaults(func=_sweep)
    ssub.add_parser("settings", help="print the effective settings").set_defaults(func=_settings)
    from cli.backup import register_service_commands
    register_service_commands(ssub)
    s.set_defaults(func=lambda args: (s.print_help(), 2)[1])


def _settings_of(args):
    from shared.service.settings import Settings
    s = Settings.from_env()
    if getattr(args, "database_url", None):
        s = s.replace(database_url=args.database_url)
    return s


def _session_factory(args):
    from shared.service.db import make_engine, make_sessionmaker
    return make_sessionmaker(make_engine(_settings_of(args)))


def _positive_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not days > 0:
        raise argparse.ArgumentTypeError("must be more than 0 days")
    return days


def _cli_actor() -> str:
    """The audit log's actor for commands run on the server."""
    import getpass
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in a container
        return "cli"


def _token_create(args) -> int:
    from datetime import timedelta

    from cli import CLIError
    from shared.service.db import audit, create_token, parse_scopes, utcnow
    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    expires = utcnow() + timedelta(days=args.expires_in_days) if args.expires_in_days else None
    with _session_factory(args)() as session:
        row, plain = create_token(session, args.name, scopes=scopes, expires_at=expires)
        audit(session, _cli_actor(), "token.create", f"token:{row.id}", name=row.name, scopes=scopes,
              expires_at=expires)
        session.commit()
        if args.quiet:
            print(plain)
        else:
            print(f"token {row.id} ({row.name}) created; store it now, it is not shown again:\n{plain}")
    return 0


def _token_list(args) -> int:
    from sqlalchemy import select

    from shared.service.db import ApiToken
    with _session_factory(args)() as session:
        rows = session.execute(select(ApiToken).order_by(ApiToken.id)).scalars().all()
    print(f"{'id':>5}  {'prefix':12} {'name':24} {'scopes':18} {'created':20} {'last used':20} {'expires':20} "
          "revoked")
    for r in rows:
        fmt = (lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "-")
        print(f"{r.id:>5}  {r.prefix:12} {r.name[:24]:24} {r.scopes:18} {fmt(r.created_at):20} "
              f"{fmt(r.last_used_at):20} {fmt(r.expires_at):20} {fmt(r.revoked_at)}")
    return 0


def _token_revoke(args) -> int:
    from sqlalchemy import or_, update

    from shared.service.db import ApiToken, audit, utcnow
    cond = [ApiToken.prefix == args.token]
    if args.token.isdigit():
        cond.append(ApiToken.id == int(args.token))
    with _session_factory(args)() as session:
        n = session.execute(update(ApiToken).where(or_(*cond), ApiToken.revoked_at.is_(None))
                            .values(revoked_at=utcnow())).rowcount
        if n:
            audit(session, _cli_actor(), "token.revoke", f"token:{args.token}")
        session.commit()
    if not n:
        from cli import CLIError
        raise CLIError(f"no active token {args.token!r}")
    print(f"revoked {n} token(s)")
    return 0


def _migrate(args) -> int:
    from alembic import command
    from alembic.config import Config
    root = Path(__file__).resolve().parents[1]
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("sqlalchemy.url", _settings_of(args).database_url.replace("%", "%%"))
    command.upgrade(cfg, "head")
    return 0


def _sweep(args) -> int:
    import redis

    from shared.service.celery_app import make_celery
    from worker.sweep import sweep
    s = _settings_of(args)
    rep = sweep(s, _session_factory(args), make_celery(s), redis.Redis.from_url(s.broker_url, socket_timeout=5))
    for k, v in rep.items():
        print(f"{k}: {len(v)}")
    return 0


def _settings(args) -> int:
    s = _settings_of(args)
    for k, v in sorted(s.env().items()):
        if "SECRET" in k or ("URL" in k and "@" in v and ":" in v.split("@")[0].split("//")[-1]):
            v = "***"
        print(f"{k}={v}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="covidseg")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
