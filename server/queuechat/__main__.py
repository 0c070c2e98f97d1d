"""Command line: `python -m queuechat serve` (also installed as `queuechat`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="queuechat", description="Contact-centre web chat over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.add_argument(
        "--data-dir", default=os.environ.get("QUEUECHAT_DATA", "data"), help="embedded SQLite lives here"
    )
    serve.add_argument(
        "--database-url", default=os.environ.get("QUEUECHAT_DATABASE_URL"), help="e.g. postgresql+psycopg://..."
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
    serve.add_argument("--demo-help", action="store_true", help="print how to chat with the demo configuration")
    token = sub.add_parser("identity-token", help="sign a customer identity token (for testing a hosting site)")
    token.add_argument("--secret", required=True)
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("claims", nargs="*", help="name=value pairs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "identity-token":
        import jwt

        claims = dict(c.split("=", 1) for c in args.claims)
        claims["exp"] = int(time.time()) + args.ttl
        print(jwt.encode(claims, args.secret, algorithm="HS256"))
        return 0

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
    from .store import Database, sqlite_url

    url = args.database_url or sqlite_url(args.data_dir)
    core = Core(Database(url), config, files_dir=os.path.join(args.data_dir, "files"))
    if args.demo_help:
        from .demo import print_demo_help

        print_demo_help(config, args.listen, args.web_listen)
    origins = [o.strip() for o in args.web_origins.split(",") if o.strip()]
    asyncio.run(run(core, args.listen, args.web_listen, origins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
