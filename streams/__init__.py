"""The Faust worker: usage events from Kafka into ClickHouse and the quota database."""
