"""What the start-up check (``check_redis_setup``) and the limiter make of a Redis set up in a way
the limiter cannot work with: a node of a Redis Cluster named as a single server (refused at
start-up; a ``MOVED`` at run time gets the fail mode, never a 500), and a ``maxmemory`` with an
eviction policy that may evict the limiter's counters (a warning at start-up).

The servers are the module's own (a Redis and a Redis Cluster of a private local stack), as these
tests change their configuration; the shared Redis is left alone."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from limiter import AsyncRateLimiter, Quota, RateLimiter
from limiter.decision import REDIS_DOWN
from limiter.redis_factory import check_redis_setup
from metering.localstack import LocalStack
from metering.settings import SettingsError
from tests.integration.api_support import api_client, api_settings, auth
from tests.integration.limiter_support import StaticQuotas, settings_for

QUOTA = Quota(rate_per_sec=1000.0, burst=1000, daily_limit=1000)


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A Redis and a three-primary Redis Cluster of the module's own, stopped afterwards."""
    stack = LocalStack(tmp_path_factory.mktemp("setup-checks-stack"))
    try:
        yield stack.up(["redis", "redis-cluster"])
    finally:
        stack.down()


@pytest.fixture
def standalone(stack_env: dict[str, str]) -> Iterator[tuple[str, redis.Redis]]:
    """The private Redis's URL and an admin client; its memory settings restored afterwards."""
    url = stack_env["RATE_LIMIT_REDIS_URL"]
    admin = redis.Redis.from_url(url)
    yield url, admin
    admin.config_set("maxmemory", 0)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.close()


@pytest.fixture
def cluster(stack_env: dict[str, str]) -> Iterator[tuple[str, redis.RedisCluster]]:
    """The private Cluster's nodes and a cluster client; memory settings restored afterwards."""
    nodes = stack_env["RATE_LIMIT_REDIS_CLUSTER_NODES"]
    host, port = nodes.split(",")[0].rsplit(":", 1)
    admin = redis.RedisCluster(host=host, port=int(port))
    yield nodes, admin
    for node in admin.get_primaries():
        node.redis_connection.config_set("maxmemory", 0)
        node.redis_connection.config_set("maxmemory-policy", "noeviction")
    admin.close()


def tenant_elsewhere(admin: redis.RedisCluster, port: int) -> str:
    """A fresh tenant whose keys live on a primary other than the one at ``port``."""
    while True:
        tenant = f"t-{uuid.uuid4().hex[:12]}"
        if admin.get_node_from_key(f"rl:{{{tenant}}}:tb").port != port:
            return tenant


# --- a Cluster node named as a single server -----------------------------------------------------


def test_a_url_naming_a_cluster_node_is_refused_at_start_naming_the_variables(
    cluster: tuple[str, redis.RedisCluster],
) -> None:
    nodes, _ = cluster
    node_url = f"redis://{nodes.split(',')[1]}/0"
    with pytest.raises(
        SettingsError,
        match=r"^RATE_LIMIT_REDIS_URL: .*Redis Cluster.*RATE_LIMIT_REDIS_CLUSTER_NODES",
    ):
        check_redis_setup(settings_for("single", url=node_url))
    # The same servers named as a Cluster pass.
    assert check_redis_setup(settings_for("cluster", cluster=nodes)) is None


async def test_a_moved_reply_at_run_time_gets_the_fail_mode_not_an_error(
    cluster: tuple[str, redis.RedisCluster],
) -> None:
    """A client that is no Cluster client, on a Cluster node (the server made a Cluster after
    start, say): the tenants whose slots other nodes serve get ``MOVED``. Both limiters answer
    by the fail mode (open: allowed, degraded), as for a Redis that is down."""
    nodes, admin = cluster
    host_port = nodes.split(",")[0]
    settings = settings_for("single", url=f"redis://{host_port}/0")
    tenant = tenant_elsewhere(admin, int(host_port.rsplit(":", 1)[1]))
    quotas = StaticQuotas({tenant: QUOTA})

    sync_limiter = RateLimiter.from_settings(settings, quotas)
    decision = sync_limiter.acquire(tenant)
    assert (decision.allowed, decision.degraded, decision.reason) == (True, True, REDIS_DOWN)
    sync_limiter.close()

    async_limiter = AsyncRateLimiter.from_settings(settings, quotas)
    try:
        decision = await async_limiter.acquire(tenant)
        assert (decision.allowed, decision.degraded, decision.reason) == (True, True, REDIS_DOWN)
    finally:
        await async_limiter.redis.aclose()


async def test_a_moved_reply_through_the_api_is_no_500(
    cluster: tuple[str, redis.RedisCluster], tmp_path: Path, kafka_bootstrap: str
) -> None:
    """The same through the API (its rate-limit middleware): the request is answered, decided by
    the fail mode, with its rate-limit fields."""
    nodes, admin = cluster
    host_port = nodes.split(",")[0]
    settings = api_settings(tmp_path, f"redis://{host_port}/0", kafka_bootstrap)
    tenant = tenant_elsewhere(admin, int(host_port.rsplit(":", 1)[1]))
    async with api_client(settings) as client:
        r = await client.get(f"/v1/tenants/{tenant}/quota", headers=auth(tenant))
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("ratelimit-policy")


async def test_a_cluster_client_still_follows_a_moved_slot_itself(
    cluster: tuple[str, redis.RedisCluster],
) -> None:
    """A Cluster client's slot map goes stale (the tenant's slot is given to another primary):
    redis-py follows the ``MOVED`` itself, and the decision is counted in Redis, not degraded."""
    nodes, admin = cluster
    settings = settings_for("cluster", cluster=nodes)
    first = admin.get_primaries()[0]
    tenant = tenant_elsewhere(admin, first.port)
    quotas = StaticQuotas({tenant: QUOTA})
    sync_limiter = RateLimiter.from_settings(settings, quotas)
    async_limiter = AsyncRateLimiter.from_settings(settings, quotas)
    try:
        assert not sync_limiter.acquire(tenant).degraded  # the clients know the slot map
        assert not (await async_limiter.acquire(tenant)).degraded
        key = f"rl:{{{tenant}}}:tb"
        slot = admin.keyslot(key)
        owner = admin.get_node_from_key(key)
        # The slot's keys move to the first primary, then the slot itself.
        src, dst = owner.redis_connection, first.redis_connection
        src_id, dst_id = src.cluster("MYID"), dst.cluster("MYID")
        dst.cluster("SETSLOT", slot, "IMPORTING", src_id)
        src.cluster("SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.cluster("GETKEYSINSLOT", slot, 100)
        if keys:
            src.migrate(first.host, first.port, keys, 0, 5000)
        for conn in (dst, src):
            conn.cluster("SETSLOT", slot, "NODE", dst_id)

        decision = sync_limiter.acquire(tenant)
        assert (decision.degraded, decision.daily_used) == (False, 3)
        decision = await async_limiter.acquire(tenant)
        assert (decision.degraded, decision.daily_used) == (False, 4)
    finally:
        sync_limiter.close()
        await async_limiter.redis.aclose()


# --- eviction at maxmemory ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("maxmemory", "policy", "warned"),
    [
        ("10mb", "volatile-lru", True),
        ("10mb", "allkeys-lru", True),
        ("10mb", "volatile-ttl", True),
        ("10mb", "noeviction", False),
        ("0", "allkeys-lru", False),
    ],
)
def test_an_eviction_policy_under_maxmemory_is_warned_of_at_start(
    standalone: tuple[str, redis.Redis],
    maxmemory: str,
    policy: str,
    warned: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from metering.commands.up import warn_or_refuse_redis

    url, admin = standalone
    admin.config_set("maxmemory", maxmemory)
    admin.config_set("maxmemory-policy", policy)
    settings = settings_for("single", url=url)
    warning = check_redis_setup(settings)
    if not warned:
        assert warning is None
        return
    assert warning is not None
    assert warning.startswith("RATE_LIMIT_REDIS_URL: Redis evicts keys at maxmemory")
    assert f"maxmemory-policy {policy}" in warning
    assert "daily usage" in warning and "noeviction is recommended" in warning
    with caplog.at_level(logging.WARNING, logger="metering"):
        warn_or_refuse_redis(settings)  # `metering up` logs it and starts
    assert warning in caplog.messages


def test_an_evicting_primary_of_a_cluster_is_warned_of(
    cluster: tuple[str, redis.RedisCluster],
) -> None:
    """Every primary is asked, not only the one the client asked first."""
    nodes, admin = cluster
    settings = settings_for("cluster", cluster=nodes)
    last = admin.get_primaries()[-1].redis_connection
    last.config_set("maxmemory", "10mb")
    last.config_set("maxmemory-policy", "volatile-lru")
    warning = check_redis_setup(settings)
    assert warning is not None
    assert warning.startswith("RATE_LIMIT_REDIS_CLUSTER_NODES: Redis evicts keys at maxmemory")
    assert "maxmemory-policy volatile-lru" in warning


def test_a_redis_that_refuses_info_is_neither_warned_of_nor_refused(
    standalone: tuple[str, redis.Redis],
) -> None:
    """A managed Redis may deny ``INFO`` (here: an ACL user without it): the check says nothing
    it cannot know."""
    url, admin = standalone
    admin.config_set("maxmemory", "10mb")
    admin.config_set("maxmemory-policy", "allkeys-lru")
    user = f"lim{uuid.uuid4().hex[:8]}"
    admin.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-info"],
    )
    try:
        host_port = url.split("//", 1)[1].split("/", 1)[0]
        limited = settings_for("single", url=f"redis://{user}:pw@{host_port}/0")
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(limited.rate_limit_redis_url).info("memory")
        assert check_redis_setup(limited) is None
    finally:
        admin.acl_deluser(user)
