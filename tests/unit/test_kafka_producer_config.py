"""kafka-python producer settings translated for librdkafka."""

from __future__ import annotations

import pytest

from metering.emitter import producer_config
from metering.kafka_producer import librdkafka_config


def test_the_emitter_settings_translate_one_for_one() -> None:
    config = librdkafka_config(producer_config("k1:9092,k2:9092", linger_ms=7, compression="lz4"))
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"
    assert config["acks"] == -1  # "all"
    assert config["enable.idempotence"] == "true"
    assert config["linger.ms"] == 7
    assert config["compression.type"] == "lz4"
    assert config["batch.size"] == 64 * 1024
    assert config["partitioner"] == "murmur2_random"  # the Java client's key hash
    assert "max_block_ms" not in config and "max.block.ms" not in config


def test_librdkafka_properties_pass_through_and_unknown_names_are_refused() -> None:
    assert librdkafka_config({"queue.buffering.max.kbytes": 1024})["queue.buffering.max.kbytes"]
    with pytest.raises(ValueError, match="'max_poll_records' has no librdkafka equivalent"):
        librdkafka_config({"max_poll_records": 5})
