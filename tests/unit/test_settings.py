"""Settings: seed names kept, defaults derived from the data dir, bad values named at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from metering.settings import SettingsError, load_settings, parse_host_ports


def test_defaults_follow_design(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("METERING_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.tenant_quota_cache_ttl == 30
    assert s.rate_limit_fail_mode == "open"
    assert s.redis_mode == "single"
    assert s.quota_db_url == f"sqlite:///{tmp_path.resolve() / 'quota.db'}"
    assert s.clickhouse_url == f"chdb://{tmp_path.resolve() / 'clickhouse'}"
    assert s.clickhouse_embedded


def test_seed_names_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANT_QUOTA_CACHE_TTL", "12")
    monkeypatch.setenv("RATE_LIMIT_FAIL_MODE", "closed")
    monkeypatch.setenv("RATE_LIMIT_REDIS_CLUSTER_NODES", "10.0.0.1:7000, 10.0.0.2:7001")
    monkeypatch.setenv("RATE_LIMIT_REDIS_SENTINELS", "[::1]:26379")
    s = load_settings()
    assert s.tenant_quota_cache_ttl == 12
    assert s.rate_limit_fail_mode == "closed"
    assert s.rate_limit_redis_cluster_nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert s.rate_limit_redis_sentinels == [("::1", 26379)]
    assert s.redis_mode == "cluster"


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("TENANT_QUOTA_CACHE_TTL", "-5", "greater than 0"),
        ("TENANT_QUOTA_CACHE_TTL", "soon", "valid integer"),
        ("RATE_LIMIT_FAIL_MODE", "sideways", "'open' or 'closed'"),
        ("RATE_LIMIT_REDIS_URL", "http://localhost:6379", "redis://"),
        ("RATE_LIMIT_REDIS_URL", "redis://localhost:99999", "bad port"),
        ("RATE_LIMIT_REDIS_CLUSTER_NODES", "localhost", "not host:port"),
        ("RATE_LIMIT_REDIS_SENTINELS", "a:1,b:x", "no valid port"),
        ("KAFKA_BOOTSTRAP_SERVERS", "broker", "not host:port"),
        ("QUOTA_DB_URL", "mysql://x/y", "sqlite"),
        ("CLICKHOUSE_URL", "ftp://x", "chdb"),
        ("CLICKHOUSE_URL", "http://", "no host"),
        ("CLICKHOUSE_URL", "chdb://", "no folder"),
        ("QUOTA_DB_URL", "sqlite", "not a URL"),
        ("QUOTA_DB_URL", "postgresql://", "no host"),
        ("KAFKA_BOOTSTRAP_SERVERS", ",", "no host:port"),
        ("KAFKA_BOOTSTRAP_SERVERS", "broker:\uff19\uff10\uff19\uff12", "no valid port"),
        ("RATE_LIMIT_BREAKER_RESET", "inf", "finite"),  # the breaker would never half-open
        ("RATE_LIMIT_LOCAL_CEILING_PER_SEC", "nan", "finite"),
        ("QUOTA_DEFAULT_PLAN", "bogus", "unknown plan"),
        ("WORKER_BACKFILL_METER", "a b", "invalid meter"),
        ("WORKER_BACKFILL_MEASURE", "requests", "'decisions' or 'meter'"),
        # Accepted once, then failing later or never applied:
        ("QUOTA_DEFAULT_PLAN", "custom", "no default limits"),  # create_app raised at start
        ("JWT_LEEWAY", "inf", "finite"),  # no token would ever expire
        ("JWT_LEEWAY", "3600", "less than or equal to 300"),
        ("EVENT_MAX_LATENESS", "1e11", "less than or equal to 2678400"),  # dates overflowed
        ("EVENT_MAX_FUTURE_SKEW", "6307200000", "less than or equal to 86400"),
        ("TENANT_QUOTA_CACHE_TTL", "10000000000000000", "less than or equal to 86400"),
        ("RATE_LIMIT_REDIS_SOCKET_TIMEOUT", "1e300", "less than or equal to 3600"),
        ("RATE_LIMIT_REDIS_CONNECT_TIMEOUT", "1e300", "less than or equal to 3600"),
        ("RATE_LIMIT_REDIS_URL", "redis://localhost:6379/abc", "a Redis database is a number"),
        ("RATE_LIMIT_REDIS_URL", "redis://localhost/0?socket_timeout=abc", "socket_timeout"),
        ("RATE_LIMIT_ROUTE_COSTS", '{"/v1/usage": 9007199254740993}', "less than or equal"),
        ("RATE_LIMIT_ROUTE_COSTS", '{"/v1/usage": true}', "valid integer"),
        ("RATE_LIMIT_ROUTE_COSTS", '{"v1/usage": 2}', "must be a path starting with '/'"),
        ("RATE_LIMIT_ROUTE_METERS", '{"/v1/usage": "bad meter"}', "invalid meter"),
    ],
)
def test_bad_value_names_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"{var}={value!r}" in str(err.value)
    assert fragment in str(err.value)


def test_a_path_the_cli_cannot_use_is_a_message_not_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "dev", "up", "--only", "redis",
         "--root", "/etc/passwd/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Not a directory: '/etc/passwd/x'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_setting_stops_the_cli_with_exit_2_and_a_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "kafka", "init"],
        env={"TENANT_QUOTA_CACHE_TTL": "-1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "TENANT_QUOTA_CACHE_TTL='-1'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_json_setting_that_does_not_parse_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RATE_LIMIT_ROUTE_COSTS", "{bad")
    with pytest.raises(SettingsError, match="RATE_LIMIT_ROUTE_COSTS: not valid JSON"):
        load_settings()


def test_host_port_parsing() -> None:
    assert parse_host_ports("") == []
    assert parse_host_ports("a:1,b:2") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="no valid port"):
        parse_host_ports("a:0")


def test_lateness_must_be_less_than_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows later than the table's TTL would be deleted as soon as they were stored."""
    monkeypatch.setenv("EVENT_MAX_LATENESS", str(10 * 86400))
    monkeypatch.setenv("CLICKHOUSE_RETENTION_DAYS", "5")
    with pytest.raises(
        SettingsError,
        match="EVENT_MAX_LATENESS=864000: must be less than CLICKHOUSE_RETENTION_DAYS=5 days",
    ):
        load_settings()
    monkeypatch.setenv("CLICKHOUSE_RETENTION_DAYS", "11")
    assert load_settings().event_max_lateness == 10 * 86400


def test_the_ingest_margin_leaves_the_pipeline_part_of_the_lateness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """POST /v1/events takes events up to the lateness less a margin: by default a tenth of
    it, at most 300 s; set, it must leave some of the lateness."""
    assert load_settings().ingest_max_age == 3 * 3600 - 300
    monkeypatch.setenv("EVENT_MAX_LATENESS", "120")
    assert load_settings().ingest_max_age == 108
    monkeypatch.setenv("API_INGEST_LATENESS_MARGIN", "0")
    assert load_settings().ingest_max_age == 120
    monkeypatch.setenv("API_INGEST_LATENESS_MARGIN", "120")
    with pytest.raises(
        SettingsError,
        match="API_INGEST_LATENESS_MARGIN=120: must be less than EVENT_MAX_LATENESS=120",
    ):
        load_settings()
    monkeypatch.setenv("API_INGEST_LATENESS_MARGIN", "-1")
    with pytest.raises(SettingsError, match="API_INGEST_LATENESS_MARGIN"):
        load_settings()


def test_route_costs_and_meters_from_the_environment_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RATE_LIMIT_ROUTE_COSTS", '{"POST /v1/events": 5, "/v1/usage": 2}')
    monkeypatch.setenv("RATE_LIMIT_ROUTE_METERS", '{"/v1/usage": "queries"}')
    s = load_settings()
    assert s.rate_limit_route_costs == {"POST /v1/events": 5, "/v1/usage": 2}
    assert s.rate_limit_route_meters == {"/v1/usage": "queries"}


def test_a_command_error_run_as_a_module_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    """As ``python -m metering.cli`` the CLI is ``__main__``; the commands raise
    ``metering.cli.CommandError``, which must still be the one it catches."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "public.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "metering.cli", "token", "acme"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "JWT_PUBLIC_KEY": str(key), "METERING_DATA_DIR": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        "metering: JWT_PUBLIC_KEY is set: tokens are signed by your identity provider\n"
    )


def test_config_masks_the_password_of_every_url_and_keeps_the_rest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from metering.cli import main
    from metering.settings import get_settings

    given = {
        "RATE_LIMIT_REDIS_URL": "redis://:s3cretpw@cache:6379/0",
        "QUOTA_DB_URL": "postgresql://app:dbpass@db:5432/quota?sslmode=require",
        "CLICKHOUSE_URL": "https://metering:chpass@ch:8443/?secure=1",
        "RATE_LIMIT_REDIS_SENTINELS": "admin:sentinelpw@s1:26379,s2:26379",
        "RATE_LIMIT_REDIS_PASSWORD": "redispw",
        "JWT_SECRET": "jwtsecret-0123456789abcdef0123456789",
    }
    for var, value in given.items():
        monkeypatch.setenv(var, value)
    get_settings.cache_clear()
    try:
        assert main(["config"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    shown = dict(line.split("=", 1) for line in out.splitlines())
    assert shown["RATE_LIMIT_REDIS_URL"] == "redis://:***@cache:6379/0"
    assert shown["QUOTA_DB_URL"] == "postgresql://app:***@db:5432/quota?sslmode=require"
    assert shown["CLICKHOUSE_URL"] == "https://metering:***@ch:8443/?secure=1"
    assert shown["RATE_LIMIT_REDIS_SENTINELS"] == "admin:***@s1:26379,s2:26379"
    assert shown["RATE_LIMIT_REDIS_PASSWORD"] == shown["JWT_SECRET"] == "***"
    for secret in ("s3cretpw", "dbpass", "chpass", "sentinelpw", "redispw", "jwtsecret"):
        assert secret not in out


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("redis://cache:6379/0?password=pw&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("unix://:pw@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("postgresql://u:p%40w@h1:5432,h2:5432/q", "postgresql://u:***@h1:5432,h2:5432/q"),
        ("chdb:///var/clickhouse", "chdb:///var/clickhouse"),
        ("sqlite:////var/quota.db", "sqlite:////var/quota.db"),
        ("127.0.0.1:9092,127.0.0.1:9093", "127.0.0.1:9092,127.0.0.1:9093"),
        ('{"POST /v1/events": 5}', '{"POST /v1/events": 5}'),
    ],
)
def test_redaction_masks_only_the_password(value: str, shown: str) -> None:
    from metering.redact import redact

    assert redact(value) == shown


def test_a_data_dir_that_is_a_file_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    monkeypatch.setenv("METERING_DATA_DIR", str(a_file))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"METERING_DATA_DIR={str(a_file)!r}: must be a folder" in str(err.value)
    assert "exists and is not one" in str(err.value)


def test_a_data_dir_under_a_file_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    below = a_file / "data" / "more"
    monkeypatch.setenv("METERING_DATA_DIR", str(below))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"METERING_DATA_DIR={str(below)!r}" in str(err.value)
    assert f"{a_file} is not a folder" in str(err.value)


def test_a_data_dir_that_is_a_dangling_link_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("METERING_DATA_DIR", str(link))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"METERING_DATA_DIR={str(link)!r}: must be a folder" in str(err.value)


def test_a_data_dir_under_a_read_only_folder_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root may write anywhere: let the check see what a user would
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: os.fspath(p) != str(locked) and real_access(p, mode)
        )
    monkeypatch.setenv("METERING_DATA_DIR", str(locked / "data"))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert f"METERING_DATA_DIR={str(locked / 'data')!r}" in str(err.value)
    assert f"{locked} is not writable" in str(err.value)


def test_a_data_dir_that_can_be_made_is_accepted_and_not_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    later = tmp_path / "a" / "b" / "c"
    monkeypatch.setenv("METERING_DATA_DIR", str(later))
    assert load_settings().metering_data_dir == later
    assert not (tmp_path / "a").exists()  # made by whoever needs it, not by the settings
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("METERING_DATA_DIR", "relative/var")
    assert load_settings().quota_db_url == f"sqlite:///{tmp_path.resolve()}/relative/var/quota.db"


@pytest.mark.parametrize("below", ["q.db", "sub/q.db"])
def test_a_sqlite_quota_db_whose_folder_cannot_be_made_names_the_variable(
    tmp_path, below: str
) -> None:
    from metering.quota_db import make_engine

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    url = f"sqlite:///{a_file / below}"
    with pytest.raises(SettingsError) as err:
        make_engine(url)
    assert f"QUOTA_DB_URL={url!r}" in str(err.value)
    assert str((a_file / below).parent) in str(err.value)


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "metering.cli", *args],
        env={"PATH": "/usr/bin:/bin", **env},  # no other setting from this process
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_db_migrate_with_a_data_dir_that_is_a_file_exits_with_a_message(tmp_path) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    proc = _cli("db", "migrate", METERING_DATA_DIR=str(a_file))
    assert proc.returncode == 2, proc.stderr
    assert f"METERING_DATA_DIR={str(a_file)!r}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert a_file.read_text() == "x"


def test_db_migrate_with_a_quota_db_folder_that_cannot_be_made_exits_with_a_message(
    tmp_path,
) -> None:
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    url = f"sqlite:///{a_file / 'quota' / 'q.db'}"
    proc = _cli(
        "db", "migrate", "--only", "quota",
        METERING_DATA_DIR=str(tmp_path / "data"), QUOTA_DB_URL=url,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"QUOTA_DB_URL={url!r}" in proc.stderr
    assert str(a_file / "quota") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_short_jwt_secret_fails_at_start_naming_the_variable_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 3-byte HS256 key was accepted; one token gave it away offline in 0.03 s, and with it
    an admin token was forged. RFC 7518 3.2 asks for at least 256 bits."""
    monkeypatch.setenv("JWT_SECRET", "k3y")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value) == (
        "invalid setting(s): JWT_SECRET='***': 3 bytes; an HS256 key needs at least 32 "
        "(RFC 7518 3.2): make one with `openssl rand -hex 32`"
    )
    monkeypatch.setenv("JWT_SECRET", "x" * 32)
    assert load_settings().jwt_secret == "x" * 32


def test_config_shows_the_ingest_margins_in_force_when_unset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The margins default to a share of the lateness and the skew; left unset they were left
    out of `metering config`, which says it prints the effective settings."""
    from metering.cli import main
    from metering.settings import get_settings

    for var in ("API_INGEST_LATENESS_MARGIN", "API_INGEST_FUTURE_MARGIN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EVENT_MAX_LATENESS", "1000")
    monkeypatch.setenv("EVENT_MAX_FUTURE_SKEW", "300")
    get_settings.cache_clear()
    try:
        assert main(["config"]) == 0
    finally:
        get_settings.cache_clear()
    shown = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert shown["API_INGEST_LATENESS_MARGIN"] == "100"  # a tenth of 1000 s
    assert shown["API_INGEST_FUTURE_MARGIN"] == "30"  # a tenth of 300 s, at most 30
    assert list(shown).index("API_INGEST_LATENESS_MARGIN") > list(shown).index("API_MAX_BATCH")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("RATE_LIMIT_REDIS_URL", "redis://:Hunter2SecretPw@127.0.0.1:63790x/0"),
        ("QUOTA_DB_URL", "postgresql://app:Hunter2SecretPw@/quota"),
        ("CLICKHOUSE_URL", "https://default:Hunter2SecretPw@ch.example:84430/"),
        ("CLICKHOUSE_URL", "https://default:Hunter2SecretPw@[::1/"),
        ("RATE_LIMIT_REDIS_SENTINELS", "u:Hunter2SecretPw@h"),
    ],
)
def test_an_invalid_url_setting_is_named_without_its_password(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    """The security audit: the start-up error printed the whole value, password and all, into
    service logs, where JWT_SECRET was already masked and `metering config` masks URLs."""
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    message = str(err.value)
    assert f"{var}=" in message, message
    assert "Hunter2SecretPw" not in message, message
    assert "***" in message, message


def test_the_repr_of_settings_masks_secrets_and_url_passwords() -> None:
    """A repr reaches tracebacks and debug logs (an ApiContext's dataclass repr holds one)."""
    s = load_settings(
        jwt_secret="s" * 40,
        rate_limit_redis_url="redis://:Hunter2SecretPw@127.0.0.1:6379/0",
        quota_db_url="postgresql://app:Hunter2SecretPw@db/quota",
    )
    shown = repr(s)
    assert "Hunter2SecretPw" not in shown and "s" * 40 not in shown
    assert "redis://:***@127.0.0.1:6379/0" in shown and "jwt_secret='***'" in shown
    assert s.jwt_secret == "s" * 40  # the value itself unchanged


@pytest.mark.parametrize("days", ["29000", "36500"])
def test_a_retention_past_what_clickhouse_ttl_can_hold_is_refused(
    monkeypatch: pytest.MonkeyPatch, days: str
) -> None:
    """The billing audit: 36,500 days ("keep a century") was accepted, and the TTL
    ``toDateTime(time) + INTERVAL N DAY`` wrapped past 2106 into 1970: every row was deleted as
    it was stored, while billing still answered from the rollups."""
    monkeypatch.setenv("CLICKHOUSE_RETENTION_DAYS", days)
    with pytest.raises(SettingsError, match=rf"CLICKHOUSE_RETENTION_DAYS='{days}'.*10000"):
        load_settings()
    monkeypatch.setenv("CLICKHOUSE_RETENTION_DAYS", "10000")
    assert load_settings().clickhouse_retention_days == 10000
