"""``detfleet``: a thin dispatcher. Each subcommand's module is imported only when it runs, so a gateway
that only produces never loads the consumer's ONNX Runtime, and the other way round.

Every command fails the same way: an expected failure (a service unreachable or refusing us, a missing
model, a bad setting) is one line on stderr and no traceback. Exit codes: 0 success, 1 a runtime failure
(broker or database unreachable or refusing), 2 a usage error (bad arguments, settings or input files such
as a missing model or source). ``--json`` output is the only thing a command writes to stdout.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from shared.errors import DetfleetError

EXIT_OK, EXIT_USAGE = 0, 2

# name -> (module:function taking argv, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": ("producer.cli:main", "publish frames from a folder, video file or stream"),
    "consume": ("consumer.cli:main", "run a worker replica"),
    "gateway": ("producer.http.cli:main", "the HTTP gateway: frames in over HTTP, live results out, a page"),
    "topology": ("detfleet.ops:topology_main", "apply the broker topology, or print its definitions"),
    "broker": ("detfleet.ops:broker_main", "bootstrap broker users and passwords"),
    "db": ("detfleet.ops:db_main", "create the database, apply migrations, prune old rows"),
    "dlq": ("detfleet.dlq:main", "list, show, replay, export and purge failed tasks and their DLQ entries"),
    "status": ("detfleet.status:main", "queues, rows, DLQ reasons, consumers and scale advice"),
    "results": ("detfleet.results:main", "result rows, live result events, and the webhook forwarder"),
    "plan": ("detfleet.plan:main", "replicas, cores, GPUs and broker nodes for N cameras at F fps"),
}


def detfleet_version() -> str:
    try:
        return version("detfleet")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _usage() -> str:
    lines = ["usage: detfleet [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run 'detfleet <command> --help' for a command's options."]
    return "\n".join(lines)


def _load(target: str) -> Callable[[Sequence[str]], int]:
    module, function = target.split(":")
    entry: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        print(f"detfleet {detfleet_version()}")
        return EXIT_OK
    if args[0] not in COMMANDS:
        print(f"detfleet: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _load(COMMANDS[args[0]][0])(args[1:])
    except DetfleetError as error:
        print(f"detfleet {args[0]}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
