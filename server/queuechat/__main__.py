"""Command line: `python -m queuechat serve` (also installed as `queuechat`)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

from . import eventloop
from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="queuechat", description="Contact-centre web chat over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    _database_options(serve)
    serve.add_argument(
        "--migrate", action="store_true", help="upgrade the database schema first if it is behind (default: refuse)"
    )
    serve.add_argument("--listen", default=os.environ.get("QUEUECHAT_LISTEN", "[::]:50051"))
    serve.add_argument(
        "--web-listen",
        default=os.environ.get("QUEUECHAT_WEB_LISTEN", "0.0.0.0:8080"),
        help="customer chat page and grpc-web bridge (empty: off)",
    )
    serve.add_argument(
        "--web-origins",
        default=os.environ.get("QUEUECHAT_WEB_ORIGINS", ""),
        help="comma-separated origins of other sites whose pages may call the bridge (CORS)",
    )
    serve.add_argument(
        "--metrics-listen",
        default=os.environ.get("QUEUECHAT_METRICS_LISTEN", "0.0.0.0:9464"),
        help="Prometheus /metrics: comma-separated HOST:PORT, `web` for the web port too (empty: off)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("QUEUECHAT_LOG_FORMAT", "text"),
        help="json: one object per line, for log shippers",
    )
    serve.add_argument(
        "--nats-url",
        default=os.environ.get("QUEUECHAT_NATS_URL"),
        help="run as one node of a cluster: NATS between the nodes (needs a PostgreSQL --database-url)",
    )
    serve.add_argument(
        "--node-id", default=os.environ.get("QUEUECHAT_NODE_ID"), help="this node's name in leases, logs, health"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("QUEUECHAT_WORKERS", "1")),
        help="start N cluster nodes on this machine behind the same ports (PostgreSQL + NATS only)",
    )
    serve.add_argument("--demo-help", action="store_true", help="print how to chat with the demo configuration")
    token = sub.add_parser("identity-token", help="sign a customer identity token (for testing a hosting site)")
    token.add_argument("--secret", required=True)
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("claims", nargs="*", help="name=value pairs")
    _db_parser(sub)
    args = parser.parse_args(argv)

    from .observability.logs import handler

    if not logging.getLogger().handlers:  # else basicConfig would drop the handler, its thread left running
        logging.basicConfig(level=logging.INFO, handlers=[handler(getattr(args, "log_format", "text"))])
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its set-up chatter; queuechat.store.migrations logs steps
    if args.command == "identity-token":
        import jwt

        claims = dict(c.split("=", 1) for c in args.claims)
        claims["exp"] = int(time.time()) + args.ttl
        print(jwt.encode(claims, args.secret, algorithm="HS256"))
        return 0
    if args.command == "db":
        return _db_main(args)

    try:
        config = load_config(args.config)
    except ConfigError as e:
        # Each problem names the file or the environment variable already.
        print("queuechat: invalid configuration:", *e.problems, sep="\n  ", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"queuechat: cannot load {args.config}: {e}", file=sys.stderr)
        return 2

    from .api.server import serve as run
    from .domain.core import Core
    from .store import Database

    url = _database_url(args)
    if url is None:
        return 2
    try:
        eventloop.factory()
    except ValueError as e:
        print(f"queuechat: {e}", file=sys.stderr)
        return 2
    problem = _cluster_problem(args, url)
    if problem:
        print(f"queuechat: {problem}", file=sys.stderr)
        return 2
    problem = _schema_problem(args, url)
    if problem:
        print(f"queuechat: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        from .workers import run_workers

        if args.demo_help:
            from .demo import print_demo_help

            print_demo_help(config, args.listen, args.web_listen)
        return run_workers(sys.argv[1:] if argv is None else argv, args.workers, args.node_id, args.metrics_listen)
    core = Core(
        Database(url),
        config,
        files_dir=os.path.join(args.data_dir, "files"),
        node_id=args.node_id,
        nats_url=args.nats_url,
    )
    if args.demo_help:
        from .demo import print_demo_help

        print_demo_help(config, args.listen, args.web_listen)
    origins = [o.strip() for o in args.web_origins.split(",") if o.strip()]
    eventloop.run(run(core, args.listen, args.web_listen, origins, args.metrics_listen))
    return 0


# --- the database: URL, schema check, `queuechat db ...` -------------------------------------------------


def _database_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("QUEUECHAT_DATA", "data"), help="embedded SQLite lives here")
    p.add_argument(
        "--database-url", default=os.environ.get("QUEUECHAT_DATABASE_URL"), help="e.g. postgresql+psycopg://..."
    )


def _database_url(args: argparse.Namespace) -> str | None:
    """--database-url (or $QUEUECHAT_DATABASE_URL), else SQLite in --data-dir; None, said why, if unusable."""
    from .store import sqlite_url

    url: str = args.database_url or sqlite_url(args.data_dir)
    if url.startswith("postgresql"):
        # The driver is an extra: without it SQLAlchemy would fail deep inside create_engine.
        try:
            import psycopg  # noqa: F401
        except ImportError:
            print("queuechat: PostgreSQL needs the postgres extra: pip install 'queuechat[postgres]'", file=sys.stderr)
            return None
    return url


def _cluster_problem(args: argparse.Namespace, url: str) -> str | None:
    """A cluster is PostgreSQL + NATS; say plainly what is missing."""
    if args.workers < 1:
        return "--workers must be at least 1"
    if args.workers > 1 and not url.startswith("postgresql"):
        return (
            f"--workers {args.workers} needs a cluster: the embedded SQLite database is for one process. "
            "Give --database-url postgresql+psycopg://... and --nats-url nats://..."
        )
    if args.workers > 1 and not args.nats_url:
        return f"--workers {args.workers} needs --nats-url (NATS carries events between the nodes)"
    if args.nats_url and not url.startswith("postgresql"):
        return "--nats-url runs a cluster node, which needs PostgreSQL: give --database-url postgresql+psycopg://..."
    if args.nats_url:
        try:
            import nats  # noqa: F401
        except ImportError:
            return "a cluster node needs the cluster extra: pip install 'queuechat[cluster]'"
    return None


def _shown(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _upgrade_command(args: argparse.Namespace) -> str:
    """The `queuechat db upgrade` that reaches the same database (never with its password)."""
    if not args.database_url:
        return f"queuechat db upgrade --data-dir {shlex.quote(args.data_dir)}"
    if args.database_url == os.environ.get("QUEUECHAT_DATABASE_URL"):
        return "queuechat db upgrade  (with the same QUEUECHAT_DATABASE_URL)"
    return f"queuechat db upgrade --database-url {shlex.quote(_shown(args.database_url))}"


def _schema_problem(args: argparse.Namespace, url: str) -> str | None:
    """Before serving: an empty database gets the schema, a current one is used; one that is behind is
    upgraded with --migrate, else refused (with the command to run), as is one from a newer queuechat."""
    from sqlalchemy.exc import SQLAlchemyError

    from .store import migrations

    try:
        migrations.ensure(url, migrate=args.migrate)
    except migrations.SchemaBehind as e:
        return f"{e}.\n  run: {_upgrade_command(args)}\n  (or start serve with --migrate)"
    except migrations.SchemaAhead as e:
        return f"{e}. Run that queuechat, or restore a backup from before it."
    except SQLAlchemyError as e:
        return f"cannot use the database {_shown(url)}: {getattr(e, 'orig', None) or e}"
    return None


def _db_parser(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="the database schema: upgrade, current, history (docs/operations.md)")
    cmds = db.add_subparsers(dest="db_command", required=True)
    upgrade = cmds.add_parser("upgrade", help="upgrade the schema to this queuechat's (creates an empty database)")
    current = cmds.add_parser("current", help="the database's schema revision")
    current.add_argument("--check", action="store_true", help="exit 1 unless the schema is current")
    history = cmds.add_parser("history", help="the schema revisions, newest first; the database's is marked")
    for p in (upgrade, current, history):
        _database_options(p)
    revision = cmds.add_parser(
        "revision", help="(developers) autogenerate the next revision from the models into store/migrations/versions"
    )
    revision.add_argument("-m", "--message", required=True)
    revision.add_argument("--database-url", help="compare on this (empty) database; default: a temporary SQLite file")


def _db_main(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .store import migrations

    if args.db_command == "revision":
        return _db_revision(args)
    sqlite_file = os.path.join(args.data_dir, "queuechat.db")
    if args.db_command != "upgrade" and not args.database_url and not os.path.exists(sqlite_file):
        # Not made by looking: a mistyped --data-dir would leave an empty database behind.
        print(f"no database at {sqlite_file} (serve or db upgrade makes it)")
        if args.db_command == "history":
            _print_history(None)
        return 1 if args.db_command == "current" and args.check else 0
    url = _database_url(args)
    if url is None:
        return 2
    try:
        if args.db_command == "upgrade":
            before, after = migrations.upgrade(url)
            if before.state is migrations.State.CURRENT:
                print(f"{_shown(url)}: already at revision {after.revision} (head)")
            else:
                print(f"{_shown(url)}: {before.revision or before.state.value} -> {after.revision} (head)")
            return 0
        status = migrations.status(url)
    except (migrations.SchemaError, SQLAlchemyError) as e:
        reason = getattr(e, "orig", None) or e
        print(f"queuechat: {_shown(url)}: {reason}", file=sys.stderr)
        return 2
    if args.db_command == "current":
        print(f"{_shown(url)}: {status.describe()}")
        if status.state in (migrations.State.BEHIND, migrations.State.LEGACY):
            print(f"  run: {_upgrade_command(args)}")
        return 1 if args.check and status.state is not migrations.State.CURRENT else 0
    _print_history(status.revision)
    return 0


def _print_history(current: str | None) -> None:
    from .store import migrations

    top = migrations.head()
    for rev in migrations.revisions():
        marks = ", ".join(m for m, on in (("head", rev.revision == top), ("current", rev.revision == current)) if on)
        label = f"{rev.revision} ({marks})" if marks else rev.revision
        print(f"{label:<22} {' '.join(rev.doc.split())}")


def _db_revision(args: argparse.Namespace) -> int:
    import tempfile

    from .store import migrations

    with tempfile.TemporaryDirectory(prefix="queuechat-revision-") as scratch:
        url = args.database_url or f"sqlite:///{os.path.join(scratch, 'scratch.db')}"
        made = migrations.new_revision(args.message, url)
    if made is None:
        print("queuechat: no revision written", file=sys.stderr)
        return 1
    print(f"wrote {made.path}: review it (autogenerate misses renames), then run tests/test_migrations.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
