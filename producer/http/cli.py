"""``detfleet gateway``: serve the HTTP gateway; ``detfleet gateway hash-token``: a token's stored form."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from producer.http.auth import hash_token, new_token
from shared.logs import configure_logging
from shared.settings import GatewaySettings, load_settings


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detfleet gateway",
        description="The HTTP gateway: POST /v1/frames, GET /v1/tasks/{id}, live results, the live page "
        "at /. 'detfleet gateway hash-token' prints a token's stored form.",
    )
    parser.add_argument("--host", help="address to listen on (DETFLEET_GATEWAY_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (DETFLEET_GATEWAY_PORT, default 8000)")
    return parser


def _hash_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detfleet gateway hash-token",
        description="Print a token entry for DETFLEET_GATEWAY_TOKENS_FILE. Without --token a new random "
        "token is made and printed once on stderr; only its sha256 goes into the file.",
    )
    parser.add_argument("--name", required=True, help="who the token is for, e.g. line-1-cam-3")
    parser.add_argument("--token", help="hash this token instead of making one ('-' reads it from stdin)")
    parser.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="SITE/CAMERA",
        help="cameras it may publish for, as globs (repeatable; '*' for all)",
    )
    parser.add_argument("--read", action="store_true", help="it may read results and the live page")
    return parser


def hash_token_main(argv: Sequence[str]) -> int:
    args = _hash_parser().parse_args(argv)
    token = args.token
    if token == "-":
        token = sys.stdin.readline().strip()
    if token is None:
        token = new_token()
        print(f"token (give it to the client; it is not stored): {token}", file=sys.stderr)
    entry = {"name": args.name, "sha256": hash_token(token), "publish": args.publish, "read": args.read}
    print(json.dumps(entry))
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "hash-token":
        return hash_token_main(argv[1:])
    args = _serve_parser().parse_args(argv)
    overrides = {k: v for k, v in (("gateway_host", args.host), ("gateway_port", args.port)) if v is not None}
    settings = load_settings(GatewaySettings, **overrides)
    configure_logging(settings.log_level, settings.log_json)
    # Imported here: `hash-token` and --help need neither uvicorn nor the app.
    import uvicorn

    from producer.http.app import create_app

    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,  # detfleet's logging, configured above
        access_log=False,  # /metrics counts requests; a line per frame would drown the log
        timeout_graceful_shutdown=int(settings.confirm_timeout_s),
    )
    return 0
