"""The ``metering`` command. Each area registers its subcommands from its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from metering.settings import SettingsError

# Modules that contribute subcommands: each has ``register(subparsers)``.
COMMAND_MODULES = [
    "metering.commands.dev",
    "metering.commands.kafka",
    "metering.commands.demo",
    "metering.commands.worker",
    "metering.commands.tenants",
    "metering.commands.db",
    "metering.commands.api",
    "metering.commands.usage",
    "metering.commands.up",
    "metering.commands.reconcile",
    "metering.commands.config",
]


class CommandError(RuntimeError):
    """A command could not do what it was asked; printed without a traceback, exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metering", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "aiokafka", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if not args.verbose:  # a Kafka outage: one line per client logger a minute, not hundreds
        from metering.logthrottle import throttle_kafka_repeats

        throttle_kafka_repeats()
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return int(handler(args) or 0)
    except SettingsError as exc:
        print(f"metering: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"metering: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path given that cannot be read or made (--root, --data-dir, ...)
        if args.verbose:
            raise
        print(f"metering: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a store unreachable, not migrated, or held by another process
        from metering.commands.store_errors import store_failure

        message = store_failure(exc)
        if message is None or args.verbose:
            raise
        print(f"metering: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as ``python -m metering.cli`` this file is ``__main__``, a module apart from the
    # ``metering.cli`` whose CommandError the commands raise: run that module's main.
    from metering.cli import main as cli_main

    sys.exit(cli_main())
