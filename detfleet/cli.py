"""``detfleet``: a thin dispatcher. Each subcommand's module is imported only when it runs, so a gateway
that only produces never loads the consumer's ONNX Runtime, and the other way round."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from shared.errors import DetfleetError

# name -> (module:function taking argv, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "produce": ("producer.cli:main", "publish frames from a folder, video file or stream"),
    "consume": ("consumer.cli:main", "run a worker replica"),
    "topology": ("detfleet.ops:topology_main", "apply the broker topology, or print its definitions"),
    "broker": ("detfleet.ops:broker_main", "bootstrap broker users and passwords"),
    "db": ("detfleet.ops:db_main", "create the database and apply migrations"),
    "dlq": ("detfleet.dlq:main", "inspect, replay and purge the dead-letter queue"),
}


def _usage() -> str:
    lines = ["usage: detfleet <command> [options]", "", "commands:"]
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
        print(_usage())
        return 0 if args else 2
    if args[0] not in COMMANDS:
        print(f"detfleet: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _load(COMMANDS[args[0]][0])(args[1:])
    except DetfleetError as error:
        print(f"detfleet {args[0]}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
