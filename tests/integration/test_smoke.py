"""Each real component answers from Python: no fakes anywhere in this file."""

from __future__ import annotations

import asyncio
import uuid

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from metering.settings import parse_host_ports

INCR_BOTH = """
local a = redis.call('INCRBY', KEYS[1], ARGV[1])
local b = redis.call('INCRBY', KEYS[2], ARGV[1])
return {a, b}
"""


def test_redis_lua_round_trip(redis_url: str, tenant: str) -> None:
    client = redis.Redis.from_url(redis_url)
    script = client.register_script(INCR_BOTH)
    keys = [f"rl:{{{tenant}}}:a", f"rl:{{{tenant}}}:b"]
    assert script(keys=keys, args=[3]) == [3, 3]
    assert script(keys=keys, args=[4]) == [7, 7]
    client.delete(*keys)


def test_redis_cluster_runs_a_script_on_hash_tagged_keys(redis_cluster_nodes: str) -> None:
    nodes = [ClusterNode(h, p) for h, p in parse_host_ports(redis_cluster_nodes)]
    client = RedisCluster(startup_nodes=nodes)
    assert len(client.get_primaries()) == 3
    # Keys of many tenants spread over all three masters; one tenant's keys share a slot.
    slots = {client.keyslot(f"rl:{{t{i}}}:tb") for i in range(50)}
    owners = {client.get_node_from_key(f"rl:{{t{i}}}:tb").name for i in range(50)}
    assert len(slots) > 10 and len(owners) == 3
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    keys = [f"rl:{{{tenant}}}:a", f"rl:{{{tenant}}}:b"]
    assert client.keyslot(keys[0]) == client.keyslot(keys[1])
    script = client.register_script(INCR_BOTH)
    assert script(keys=keys, args=[2]) == [2, 2]
    client.delete(*keys)
    client.close()


def test_redis_sentinel_finds_master_and_replica(redis_sentinels: tuple[str, str]) -> None:
    addrs, master_name = redis_sentinels
    sentinel = Sentinel(parse_host_ports(addrs), socket_timeout=1.0)
    master = sentinel.master_for(master_name, socket_timeout=1.0)
    key = f"smoke:{uuid.uuid4().hex}"
    master.set(key, "v")
    assert master.get(key) == b"v"
    assert len(sentinel.discover_slaves(master_name)) == 1
    master.delete(key)


def test_kafka_produce_with_kafka_python_consume_with_aiokafka_group(kafka_bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 3, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    for i in range(30):
        producer.send(topic, key=f"k{i % 5}".encode(), value=f"v{i}".encode())
    producer.flush()
    producer.close()

    async def consume() -> list[tuple[bytes, bytes]]:
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=f"g-{topic}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        got: list[tuple[bytes, bytes]] = []
        try:
            async with asyncio.timeout(30):
                while len(got) < 30:
                    batch = await consumer.getmany(timeout_ms=1000)
                    for records in batch.values():
                        got.extend((r.key, r.value) for r in records)
            await consumer.commit()
            assert consumer.assignment()  # joined the group and got partitions
        finally:
            await consumer.stop()
        return got

    got = asyncio.run(consume())
    assert sorted(v for _, v in got) == sorted(f"v{i}".encode() for i in range(30))
    # Per-key order holds (same key -> same partition).
    for k in range(5):
        values = [int(v[1:]) for key, v in got if key == f"k{k}".encode()]
        assert values == sorted(values)


def test_clickhouse_embedded_create_insert_query(clickhouse_client, clickhouse_db: str) -> None:
    ch = clickhouse_client
    ch.command(
        f"CREATE TABLE {clickhouse_db}.usage (tenant String, ts DateTime64(3, 'UTC'), q Float64) "
        "ENGINE = MergeTree ORDER BY (tenant, ts)"
    )
    rows = [["a", 1_700_000_000.0 + i, float(i)] for i in range(100)]
    import datetime as dt

    rows = [[t, dt.datetime.fromtimestamp(ts, dt.UTC), q] for t, ts, q in rows]
    ch.insert(f"{clickhouse_db}.usage", rows, column_names=["tenant", "ts", "q"])
    result = ch.query(
        f"SELECT count(), sum(q) FROM {clickhouse_db}.usage WHERE tenant = {{t:String}}",
        parameters={"t": "a"},
    ).result_rows
    assert result == [(100, 4950.0)]


def test_postgresql_round_trip(postgres_url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(postgres_url)
    name = f"smoke_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {name} (id int primary key, v text)"))
        conn.execute(text(f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b')"))
        assert conn.execute(text(f"SELECT count(*) FROM {name}")).scalar() == 2
        conn.execute(text(f"DROP TABLE {name}"))
    engine.dispose()
