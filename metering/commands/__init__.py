"""Subcommands of the ``metering`` CLI, one module per area."""
