"""``metering kafka init``: create the pipeline's topics (idempotent); ``metering kafka dlq``:
the newest dead letters, with their reasons (read-only)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from metering.cli import CommandError
from metering.commands.argtypes import positive_int
from metering.commands.usage import render_table
from metering.dead_letters import DeadLetterView, read_dead_letters
from metering.ids import printable
from metering.settings import load_settings
from metering.topics import TopicSpec, TopicState, describe_topics, ensure_topics, pipeline_topics


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kafka = sub.add_parser("kafka", help="Kafka topics")
    ksub = kafka.add_subparsers(dest="kafka_command", metavar="ACTION", required=True)
    init = ksub.add_parser("init", help="create usage.events and usage.events.dlq (idempotent)")
    init.add_argument(
        "--partitions", type=positive_int, default=None, help="partitions of usage.events"
    )
    init.set_defaults(handler=_init)
    dlq = ksub.add_parser(
        "dlq", help="the newest dead letters of usage.events.dlq with their reasons (read-only)"
    )
    dlq.add_argument(
        "--limit", type=positive_int, default=20, help="how many of the newest (default 20)"
    )
    dlq.add_argument("--json", action="store_true", help="one JSON object, keys and values too")
    dlq.set_defaults(handler=_dlq)


def _init(args: argparse.Namespace) -> int:
    overrides = {}
    if args.partitions is not None:
        overrides["usage_events_partitions"] = args.partitions
    settings = load_settings(**overrides)
    specs = pipeline_topics(settings)
    created = ensure_topics(settings.kafka_bootstrap_servers, specs)
    existing = describe_topics(
        settings.kafka_bootstrap_servers, [s.name for s in specs if s.name not in created]
    )
    for spec in specs:
        if spec.name in created:
            print(
                f"{spec.name}: created"
                f" (partitions={spec.partitions}, retention.ms={spec.retention_ms})"
            )
        else:
            print(f"{spec.name}: exists ({_existing(existing[spec.name], spec)})")
    return 0


def _existing(state: TopicState, spec: TopicSpec) -> str:
    """The topic's own partitions and retention, and where the settings ask for others."""

    def shown(value: int | None) -> str:
        return "unknown" if value is None else str(value)

    text = f"partitions={shown(state.partitions)}, retention.ms={shown(state.retention_ms)}"
    asked = state.differences(spec)
    if asked:
        wanted = ", ".join(f"{key}={value}" for key, value in asked.items())
        text += f"; settings ask {wanted}: existing topics are left as they are"
    return text


def _dlq(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.limit > MAX_DLQ_LIMIT:
        raise CommandError(f"--limit: at most {MAX_DLQ_LIMIT}, got {args.limit}")
    try:
        letters = read_dead_letters(
            settings.kafka_bootstrap_servers, settings.usage_events_dlq_topic, args.limit
        )
    except LookupError as exc:
        raise CommandError(str(exc.args[0])) from None
    if args.json:
        shown = {
            "topic": settings.usage_events_dlq_topic,
            "dead_letters": [d.to_dict() for d in letters],
        }
        print(json.dumps(shown, indent=2))
    else:
        print(_dlq_table(letters))
    return 0


def _dlq_table(letters: list[DeadLetterView], error_width: int = 100) -> str:
    """A table of ``letters`` and a count by reason; every field written printable (a dead
    letter's text is whatever a producer sent)."""
    if not letters:
        return "no dead letters"
    rows = []
    for d in letters:
        error = printable(d.error)
        if len(error) > error_width:
            error = error[: error_width - 3] + "..."
        key = printable(d.key.decode("utf-8", "replace")) if d.key is not None else "-"
        rows.append(
            [
                d.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                f"{d.partition}@{d.offset}",
                d.reason,
                key[:64],
                printable(d.source),
                error,
            ]
        )
    table = render_table(["time", "at", "reason", "key", "from", "error"], rows)
    counts = Counter(d.reason for d in letters)
    by_reason = ", ".join(f"{printable(r)} {n}" for r, n in sorted(counts.items()))
    return f"{table}\n({len(letters)} dead letters: {by_reason})"


#: Most dead letters ``kafka dlq`` reads at once (each may be up to the topic's message size).
MAX_DLQ_LIMIT = 10_000
