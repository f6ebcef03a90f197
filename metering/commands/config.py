"""``metering config``: the effective settings (secrets redacted), or ``--reference``: every
setting with its default and meaning, as the Markdown table the README carries."""

from __future__ import annotations

import argparse
import json
from typing import Any

from metering.settings import Settings, get_settings

SECRET_FIELDS = {"jwt_secret", "rate_limit_redis_password"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cfg = sub.add_parser("config", help="show the effective settings or the settings reference")
    cfg.add_argument("--reference", action="store_true", help="print every setting as Markdown")
    cfg.set_defaults(handler=_run)


def _default(field: Any) -> str:
    value = field.default_factory() if field.default_factory is not None else field.default
    if value in (None, "", []):
        return ""
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def reference() -> str:
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        default = _default(field).replace("|", "\\|")
        lines.append(f"| `{name.upper()}` | {f'`{default}`' if default else ''} | {desc} |")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference())
        return 0
    for key, value in get_settings().as_env().items():
        print(f"{key}={'***' if key.lower() in SECRET_FIELDS else value}")
    return 0
