"""``metering kafka init``: create the pipeline's topics (idempotent)."""

from __future__ import annotations

import argparse

from metering.commands.argtypes import positive_int
from metering.settings import load_settings
from metering.topics import ensure_topics, pipeline_topics


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kafka = sub.add_parser("kafka", help="Kafka topics")
    ksub = kafka.add_subparsers(dest="kafka_command", metavar="ACTION", required=True)
    init = ksub.add_parser("init", help="create usage.events and usage.events.dlq (idempotent)")
    init.add_argument(
        "--partitions", type=positive_int, default=None, help="partitions of usage.events"
    )
    init.set_defaults(handler=_init)


def _init(args: argparse.Namespace) -> int:
    overrides = {}
    if args.partitions is not None:
        overrides["usage_events_partitions"] = args.partitions
    settings = load_settings(**overrides)
    specs = pipeline_topics(settings)
    created = ensure_topics(settings.kafka_bootstrap_servers, specs)
    for spec in specs:
        state = "created" if spec.name in created else "exists"
        print(
            f"{spec.name}: {state} (partitions={spec.partitions}, retention.ms={spec.retention_ms})"
        )
    return 0
