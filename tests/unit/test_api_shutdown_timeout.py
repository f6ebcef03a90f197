"""``API_SHUTDOWN_TIMEOUT``: how long ``metering api`` lets running requests finish at a stop
(uvicorn's graceful-shutdown timeout; it was a fixed 15 s)."""

from __future__ import annotations

import pytest

from metering.commands.api import GRACEFUL_SHUTDOWN_SECONDS, server_config
from metering.settings import SettingsError, load_settings


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    pass


def test_the_server_takes_its_graceful_shutdown_timeout_from_the_setting() -> None:
    settings = load_settings(api_shutdown_timeout=3)
    config = server_config(app, "127.0.0.1", 8000, "info", settings.api_shutdown_timeout)
    assert config.timeout_graceful_shutdown == 3
    assert load_settings().api_shutdown_timeout == GRACEFUL_SHUTDOWN_SECONDS == 15
    assert server_config(app, "127.0.0.1", 8000).timeout_graceful_shutdown == 15


@pytest.mark.parametrize("value", [0, -1, 3601, 2.5, "soon"])
def test_a_shutdown_timeout_that_is_not_whole_seconds_up_to_an_hour_is_refused(
    value: object,
) -> None:
    with pytest.raises(SettingsError, match="API_SHUTDOWN_TIMEOUT"):
        load_settings(api_shutdown_timeout=value)
