"""Redis key names. All of a tenant's keys share the hash tag ``{<tenant>}``, so they live in one
Cluster slot and one Lua call may touch them all. Tenant ids are validated before they get here
(:func:`metering.ids.validate_tenant_id` refuses ``{`` and ``}``)."""

from __future__ import annotations

import datetime as dt


def token_bucket_key(tenant: str) -> str:
    return f"rl:{{{tenant}}}:tb"


def daily_counter_key(tenant: str, day: dt.date) -> str:
    return f"rl:{{{tenant}}}:day:{day:%Y%m%d}"


def window_log_key(tenant: str) -> str:
    return f"rl:{{{tenant}}}:win"


def window_meta_key(tenant: str) -> str:
    return f"rl:{{{tenant}}}:win:meta"


def tenant_keys(tenant: str, day: dt.date) -> tuple[bytes, bytes, bytes, bytes]:
    """The four KEYS of the limiter scripts, encoded, in script order."""
    return (
        token_bucket_key(tenant).encode(),
        daily_counter_key(tenant, day).encode(),
        window_log_key(tenant).encode(),
        window_meta_key(tenant).encode(),
    )
