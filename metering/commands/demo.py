"""``metering demo``: the newcomer's first command. For now it brings the local stack up, creates
the topics and prints where everything is; it grows into the full traffic demo."""

from __future__ import annotations

import argparse

from metering.commands.dev import _up


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="start the local stack and show where everything is")
    demo.add_argument("--root", default=None)
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    args.only, args.extra, args.all = ["redis", "kafka"], [], False
    return _up(args)
