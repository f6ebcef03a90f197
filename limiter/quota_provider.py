"""Where the limiter gets a tenant's quota and a lost day's usage (implemented in
:mod:`limiter.quotas`). The limiter depends only on this protocol."""

from __future__ import annotations

import datetime as dt
from typing import Protocol, runtime_checkable

from limiter.quota import Quota


class UnknownTenant(LookupError):
    """The tenant has no quota and the provider is configured not to invent one."""


@runtime_checkable
class QuotaProvider(Protocol):
    def get(self, tenant: str) -> Quota:
        """The tenant's quota, fast (cached); raises :class:`UnknownTenant`."""
        ...

    async def aget(self, tenant: str) -> Quota: ...

    def daily_seed(self, tenant: str, day: dt.date) -> int:
        """Usage already recorded for ``tenant`` on UTC ``day`` (the quota DB's backfill), used
        to seed a day counter Redis lost."""
        ...

    async def adaily_seed(self, tenant: str, day: dt.date) -> int: ...
