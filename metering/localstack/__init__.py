"""Real servers as local processes for machines without Docker; see :mod:`.stack`."""

from metering.localstack.stack import (
    DEFAULT_SERVICES,
    SERVICES,
    LocalStack,
    StackError,
    StackStart,
    default_root,
    ensure_kafka_jars,
    format_env,
)

__all__ = [
    "DEFAULT_SERVICES",
    "SERVICES",
    "LocalStack",
    "StackError",
    "StackStart",
    "default_root",
    "ensure_kafka_jars",
    "format_env",
]
