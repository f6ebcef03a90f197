"""``metering config``: the effective settings (secrets redacted), or ``--reference``: every
setting with its default and meaning, as the Markdown table the README carries.

Redacted: the secret settings themselves, and the password a URL-valued setting carries
(``redis://:pw@host``, ``postgresql://user:pw@host/db``, ``?password=pw``, a ``user:pw@host:port``
item of a node list); the rest of the URL stays readable."""

from __future__ import annotations

import argparse
import json
from typing import Any

from metering.redact import MASK, redact
from metering.settings import SECRET_FIELDS, Settings, get_settings


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
    for key, value in effective(get_settings()).items():
        print(f"{key}={MASK if key.lower() in SECRET_FIELDS else redact(value)}")
    return 0


def effective(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, with the margins that default to a share of
    another setting shown as they are in force (``as_env`` leaves unset settings out)."""
    env = settings.as_env()
    computed = {
        "API_INGEST_LATENESS_MARGIN": settings.event_max_lateness - settings.ingest_max_age,
        "API_INGEST_FUTURE_MARGIN": settings.event_max_future_skew - settings.ingest_max_ahead,
    }
    for key, value in computed.items():
        env.setdefault(key, f"{value:g}")
    order = {name.upper(): i for i, name in enumerate(Settings.model_fields)}
    return dict(sorted(env.items(), key=lambda kv: order.get(kv[0], len(order))))
