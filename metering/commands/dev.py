"""``metering dev up | down | status``: the local service stack."""

from __future__ import annotations

import argparse
import json
import time

from metering.cli import CommandError
from metering.localstack import DEFAULT_SERVICES, SERVICES, LocalStack, StackError, format_env
from metering.localstack.stack import ensure_kafka_jars
from metering.settings import load_settings


def _services(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    aliases = {"cluster": "redis-cluster", "sentinel": "redis-sentinel", "pg": "postgres"}
    names = [aliases.get(n, n) for n in names]
    for n in names:
        if n not in SERVICES:
            raise argparse.ArgumentTypeError(
                f"unknown service {n!r}; choose from {', '.join(SERVICES)}"
            )
    return names


def _stack(args: argparse.Namespace) -> LocalStack:
    root = args.root or (load_settings().metering_data_dir.resolve() / "stack")
    return LocalStack(root)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="the local service stack (real servers as processes)")
    dsub = dev.add_subparsers(dest="dev_command", metavar="ACTION", required=True)

    up = dsub.add_parser("up", help="start the local services (safe to run twice)")
    up.add_argument(
        "--only",
        type=_services,
        default=list(DEFAULT_SERVICES),
        help="comma-separated services to start (default: redis,kafka)",
    )
    up.add_argument(
        "--with",
        dest="extra",
        type=_services,
        default=[],
        help="also start these (postgres, cluster, sentinel)",
    )
    up.add_argument("--all", action="store_true", help="start every service")
    up.add_argument("--root", default=None, help="stack folder (default: $METERING_DATA_DIR/stack)")
    up.set_defaults(handler=_up)

    down = dsub.add_parser("down", help="stop what 'up' started")
    down.add_argument("--root", default=None)
    down.set_defaults(handler=_down)

    status = dsub.add_parser("status", help="show the services, their PIDs and health")
    status.add_argument("--root", default=None)
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_status)

    fetch = dsub.add_parser("fetch", help="resolve the Kafka jars with Maven into the cache")
    fetch.set_defaults(handler=lambda _a: print(ensure_kafka_jars()))


def _up(args: argparse.Namespace) -> int:
    services = list(SERVICES) if args.all else [*args.only, *args.extra]
    stack = _stack(args)
    t0 = time.monotonic()
    try:
        env = stack.up(services)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    if "kafka" in services:
        from metering.topics import ensure_topics, pipeline_topics

        settings = load_settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
        ensure_topics(env["KAFKA_BOOTSTRAP_SERVERS"], pipeline_topics(settings))
    print(
        f"# local stack up in {time.monotonic() - t0:.1f}s ({', '.join(services)}); "
        f"stop it with: metering dev down"
    )
    print(format_env(env))
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = _stack(args).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _stack(args).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if not status:
        print("no local services")
    for name, st in status.items():
        pids = " ".join(f"{m}={'up' if alive else 'DOWN'}" for m, alive in st["running"].items())
        ports = " ".join(f"{m}:{p}" for m, p in st["ports"].items())
        print(f"{name:15} {'healthy' if st['healthy'] else 'UNHEALTHY':10} {pids}  ports {ports}")
    return 0 if all(s["healthy"] for s in status.values()) else 1
