"""``metering demo``: start the product, drive synthetic tenants through it, show what happened."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time

from metering.cli import CommandError
from metering.commands.argtypes import positive_int
from metering.settings import get_settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="run the product with synthetic tenants and report")
    demo.add_argument("--tenants", type=positive_int, default=30, help="how many tenants (30)")
    demo.add_argument("--seconds", type=positive_int, default=60, help="traffic duration (60)")
    demo.add_argument("--port", type=positive_int, default=8000, help="API port (8000)")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from metering import demo
    from metering.commands.up import ensure_dev_secret, sign_token
    from metering.quota_db import QuotaStore

    console = Console(width=None if sys.stdout.isatty() else 160)
    settings = get_settings()
    ensure_dev_secret(settings)  # made before the child starts, which finds the same file
    base = f"http://127.0.0.1:{args.port}"
    log_path = settings.metering_data_dir.resolve() / "demo" / "metering-up.log"
    t0 = time.monotonic()
    runs = demo.make_tenants(args.tenants)
    result = demo.DemoResult(tenants=runs)
    console.print(
        f"[bold]metering demo[/]: starting the product ([dim]metering up, log {log_path}[/])"
    )
    with demo.metering_up(args.port, demo.child_env(settings), log_path) as proc:
        try:
            ready = demo.wait_ready(base, proc, 300, log_path)
        except RuntimeError as exc:
            raise CommandError(str(exc)) from None
        console.print(f"API answering on {base} after {ready:.1f}s")
        tokens = {r.tenant: sign_token(settings, r.tenant) for r in runs}
        demo.provision_operator(settings)
        admin = sign_token(settings, demo.OPERATOR, admin=True)
        day = dt.datetime.now(dt.UTC).date()

        async def main() -> None:
            client = demo.DemoClient(base, tokens, admin)
            try:
                await asyncio.gather(*(client.set_quota(r) for r in runs))
                console.print(
                    f"{len(runs)} tenants on plans free / pro / enterprise: "
                    + ", ".join(
                        f"{p} {v[0]:g}/s burst {v[1]} daily {v[2]:,}"
                        for p, v in demo.DEMO_PLANS.items()
                    )
                )
                with Progress(
                    TextColumn("traffic"),
                    BarColumn(),
                    TextColumn("{task.fields[sent]:>7,} requests"),
                    TimeRemainingColumn(),
                    console=console,
                ) as bar:
                    task = bar.add_task("traffic", total=args.seconds, sent=0)
                    result.traffic_seconds = await demo.drive(
                        client,
                        runs,
                        args.seconds,
                        lambda done, sent: bar.update(task, completed=done, sent=sent),
                    )
                console.print(
                    "waiting for the pipeline to catch up (Kafka -> worker -> ClickHouse "
                    "-> quota DB backfill)..."
                )
                result.caught_up_after = await demo.collect(
                    client, runs, QuotaStore(settings.quota_db_url), day, timeout=90
                )
                if result.caught_up_after is not None:  # the operator's own reads too
                    await demo.reconciled(client, day, timeout=30)
            finally:
                await client.close()

        asyncio.run(main())
        result.seconds = time.monotonic() - t0

        table = Table(title=f"what happened ({day.isoformat()}, UTC day)")
        for col in (
            "tenant",
            "plan",
            "sent",
            "allowed",
            "rejected: bucket",
            "rejected: daily",
            "Redis counter",
            "ClickHouse",
            "quota DB",
            "agree",
        ):
            left = col in {"tenant", "plan"}
            table.add_column(
                col,
                justify="left" if left else "right",
                no_wrap=left,
                min_width=26 if col == "tenant" else None,
            )
        for r in runs:
            table.add_row(
                r.tenant,
                r.plan,
                f"{r.sent:,}",
                f"{r.allowed:,}",
                f"{r.rejected_bucket:,}",
                f"{r.rejected_daily:,}",
                str(r.redis),
                str(r.clickhouse),
                str(r.quota_db),
                "yes" if r.agrees else "[red]NO[/]",
            )
        console.print(table)
        sent = sum(r.sent for r in runs)
        errors = sum(r.errors + r.rejected_other for r in runs)
        skipped = sum(r.skipped for r in runs)
        console.print(
            f"{sent:,} requests in {result.traffic_seconds:.0f}s: "
            f"{sum(r.allowed for r in runs):,} allowed, "
            f"{sum(r.rejected_bucket for r in runs):,} rejected by the token bucket, "
            f"{sum(r.rejected_daily for r in runs):,} by the daily quota, {errors} other"
            + (f"; {skipped:,} not sent while the server was behind" if skipped else "")
        )
        if result.all_agree:
            console.print(
                f"[green bold]the three sources agree[/] for every tenant (caught up "
                f"{result.caught_up_after:.1f}s after the traffic stopped)"
            )
        else:
            console.print(
                "[red bold]the sources disagree[/] for the tenants marked NO "
                "(see metering reconcile)"
            )
        console.print(
            f"\ndemo finished in {result.seconds:.0f}s; the product is stopped now.\n"
            f"To keep it running: metering up{'' if args.port == 8000 else f' --port {args.port}'}"
            f" (API docs {base}/docs, metrics {base}/metrics); a token: metering token <tenant>"
            f" [--admin]; with it running, the three sources side by side: metering reconcile"
        )
    return 0 if result.all_agree else 1
