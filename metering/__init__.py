"""The metering domain and services: settings, the usage-event model, the Kafka emitter, the quota
database, the ClickHouse schema and queries, the HTTP API, the CLI and the local service stack."""
