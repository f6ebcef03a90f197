"""Where the test suite's real services come from, in order of preference:

1. environment variables (``TEST_REDIS_URL``, ``TEST_KAFKA_BOOTSTRAP_SERVERS``,
   ``TEST_POSTGRES_URL``, ``TEST_REDIS_CLUSTER_NODES``, ``TEST_REDIS_SENTINELS`` +
   ``TEST_REDIS_SENTINEL_MASTER``, ``TEST_CLICKHOUSE_URL``): used as given, never stopped;
2. testcontainers, where a Docker engine answers (Redis, Kafka, PostgreSQL);
3. the project's local stack (:mod:`metering.localstack`), under ``var/test-stack``; what the
   session started there, it stops at the end, so a suite run leaves no process behind.

The embedded ClickHouse engine (chdb) has no process; a session gets one data folder of its own
(the engine allows one data folder per process), and tests isolate themselves by database.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metering.localstack import LocalStack

ROOT = Path(__file__).resolve().parent.parent
TEST_STACK_ROOT = ROOT / "var" / "test-stack"


@functools.lru_cache(maxsize=1)
def docker_available() -> bool:
    if os.environ.get("METERING_TEST_NO_DOCKER"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:
        return False


class ServiceProvider:
    """Hands out service addresses for one test session and cleans up what it started."""

    def __init__(self, stack_root: Path = TEST_STACK_ROOT) -> None:
        self.stack = LocalStack(stack_root)
        self._started_local: list[str] = []
        self._containers: list[Any] = []
        self._cache: dict[str, Any] = {}

    # --- generic -------------------------------------------------------------------------------
    def _local(self, service: str) -> dict[str, str]:
        before = self.stack.status().get(service, {}).get("healthy", False)
        env = self.stack.up([service])
        if not before and service not in self._started_local:
            self._started_local.append(service)
        return env

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # --- services ------------------------------------------------------------------------------
    def redis_url(self) -> str:
        def make() -> str:
            if url := os.environ.get("TEST_REDIS_URL"):
                return url
            if docker_available():
                from testcontainers.redis import RedisContainer

                c = RedisContainer("redis:7").start()
                self._containers.append(c)
                return f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
            return self._local("redis")["RATE_LIMIT_REDIS_URL"]

        return str(self._once("redis", make))

    def kafka_bootstrap(self) -> str:
        def make() -> str:
            if servers := os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS"):
                return servers
            if docker_available():
                from testcontainers.kafka import KafkaContainer

                c = KafkaContainer("confluentinc/cp-kafka:7.7.1").with_kraft().start()
                self._containers.append(c)
                return str(c.get_bootstrap_server())
            return self._local("kafka")["KAFKA_BOOTSTRAP_SERVERS"]

        return str(self._once("kafka", make))

    def postgres_url(self) -> str:
        def make() -> str:
            if url := os.environ.get("TEST_POSTGRES_URL"):
                return url
            if docker_available():
                from testcontainers.postgres import PostgresContainer

                c = PostgresContainer("postgres:16", driver="psycopg").start()
                self._containers.append(c)
                return str(c.get_connection_url())
            return self._local("postgres")["QUOTA_DB_URL"]

        return str(self._once("postgres", make))

    def redis_cluster_nodes(self) -> str:
        def make() -> str:
            if nodes := os.environ.get("TEST_REDIS_CLUSTER_NODES"):
                return nodes
            return self._local("redis-cluster")["RATE_LIMIT_REDIS_CLUSTER_NODES"]

        return str(self._once("redis-cluster", make))

    def redis_sentinels(self) -> tuple[str, str]:
        def make() -> tuple[str, str]:
            if sentinels := os.environ.get("TEST_REDIS_SENTINELS"):
                return sentinels, os.environ.get("TEST_REDIS_SENTINEL_MASTER", "mymaster")
            env = self._local("redis-sentinel")
            return env["RATE_LIMIT_REDIS_SENTINELS"], env["RATE_LIMIT_REDIS_SENTINEL_MASTER"]

        result: tuple[str, str] = self._once("redis-sentinel", make)
        return result

    def close(self) -> None:
        for c in self._containers:
            with contextlib.suppress(Exception):
                c.stop()
        if self._started_local:
            self.stack.down(self._started_local)
