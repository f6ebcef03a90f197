"""The development JWT secret that `metering up`, `metering api` and `metering token` make on
first use when the settings name none: several first starts at once all get the one secret."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from metering.commands.up import dev_secret_path, ensure_dev_secret
from metering.settings import Settings, load_settings

STARTS = 8


def start_at_once(settings: Settings) -> tuple[list[str | None], list[BaseException]]:
    """``ensure_dev_secret`` from ``STARTS`` threads released together: what each read."""
    barrier = threading.Barrier(STARTS)
    found: list[str | None] = []
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            found.append(ensure_dev_secret(settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(STARTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return found, errors


def test_first_starts_at_once_all_read_one_whole_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking for the file and then creating it left a window: a second process got
    FileExistsError, or read the file before the first had written it (an empty secret)."""
    for var in ("JWT_SECRET", "JWT_PUBLIC_KEY"):
        monkeypatch.delenv(var, raising=False)
    for attempt in range(20):
        settings = load_settings(metering_data_dir=tmp_path / str(attempt))
        found, errors = start_at_once(settings)
        assert not errors, errors
        assert len(set(found)) == 1 and len(found[0] or "") >= 48, found
        path = dev_secret_path(settings)
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_a_filesystem_without_hard_links_still_gets_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfat and some network mounts refuse hard links (EPERM): the secret is then created
    in place, exclusively, as before the link was used."""
    for var in ("JWT_SECRET", "JWT_PUBLIC_KEY"):
        monkeypatch.delenv(var, raising=False)

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    settings = load_settings(metering_data_dir=tmp_path)
    secret = ensure_dev_secret(settings)
    assert secret is not None and len(secret) >= 48
    assert ensure_dev_secret(settings) == secret
    path = dev_secret_path(settings)
    assert os.listdir(path.parent) == [path.name]
