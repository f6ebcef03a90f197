"""The emitter's Kafka producer settings: idempotent, acks=all, batched with linger, compressed."""

from __future__ import annotations

from metering.emitter import default_compression, producer_config


def test_the_producer_is_idempotent_waits_for_all_replicas_batches_and_compresses() -> None:
    config = producer_config("k1:9092,k2:9092")
    assert config["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert config["enable_idempotence"] is True
    assert config["acks"] == "all"
    assert config["linger_ms"] == 5
    assert config["compression_type"] == "lz4" == default_compression()
    assert config["max_block_ms"] <= 2000  # the sender thread's bound; the caller never waits


def test_overrides_win() -> None:
    assert producer_config("k:9092", linger_ms=20, compression="gzip", acks=1)["acks"] == 1
