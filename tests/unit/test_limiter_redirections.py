"""Cluster redirections (``MOVED``, ``ASK``) reaching the limiter: Redis unavailable, not a bug."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser
from redis.exceptions import AskError, MovedError

from limiter.failure_policy import REDIS_ERRORS, redis_unavailable


@pytest.mark.parametrize(
    ("reply", "kind"),
    [("MOVED 3999 127.0.0.1:6381", MovedError), ("ASK 3999 127.0.0.1:6381", AskError)],
)
def test_a_redirection_to_a_client_that_is_no_cluster_client_is_unavailable(
    reply: str, kind: type[Exception]
) -> None:
    """Parsed as redis-py parses them: only a Cluster client follows them (and never passes
    them on), so one that reaches the limiter means its keys cannot be reached: the fail mode."""
    exc = BaseParser.parse_error(reply)
    assert type(exc) is kind
    assert isinstance(exc, REDIS_ERRORS) and redis_unavailable(exc)


def test_keys_in_two_slots_are_still_a_bug() -> None:
    assert not redis_unavailable(BaseParser.parse_error("CROSSSLOT Keys don't hash to one slot"))
