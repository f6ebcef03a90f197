"""What the CLI says when a store fails a command: the quota DB, ClickHouse, Kafka or Redis
unreachable, not migrated, migrated by a newer release, or (the embedded engine) held by another
process. One line naming the store and the setting that names it (its password masked), with a
hint where one helps; :func:`metering.cli.main` prints it instead of the traceback, which
``--verbose`` shows.

The libraries' exception classes are looked up among the modules already imported: an error of
a library this process never imported cannot have been raised, and importing one (chdb, Kafka)
only to compare would cost more than the command did.

The API answers a store's failure on a route with a 503 that names the store
(:class:`metering.api.problems.StoreFailureRoute`) and logs this module's line for the operator.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from metering.localstack.stack import process_identity
from metering.redact import MASK, redact
from metering.settings import Settings, load_settings

MIGRATE_HINT = "run `metering db migrate`"
NEWER_HINT = "deploy the newer release"
FOLDER_IN_USE = "the folder is in use by another process (a running `metering up` or worker)"
MAX_DETAIL = 300

# A table or database the migrations make is missing (SQLite, PostgreSQL, ClickHouse).
_UNMIGRATED = re.compile(
    r"no such table|relation \S+ does not exist|has no column named|no such column"
    r"|UNKNOWN_DATABASE|UNKNOWN_TABLE"
)

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>]+")


def _classes(*names: str) -> tuple[type[BaseException], ...]:
    """The exception classes ``module.Name`` of the modules imported so far."""
    found = []
    for name in names:
        module, _, cls = name.rpartition(".")
        value = getattr(sys.modules.get(module), cls, None)
        if isinstance(value, type) and issubclass(value, BaseException):
            found.append(value)
    return tuple(found)


def _folder(clickhouse_url: str) -> Path | None:
    """The embedded engine's folder of a ``chdb://`` URL, read as clickhouse-connect reads it."""
    parts = urlsplit(clickhouse_url)
    if parts.scheme != "chdb":
        return None
    location = parts.netloc.rpartition("@")[2] if parts.netloc else parts.path
    return Path(unquote(location)) if location else None


def embedded_folder_in_use(clickhouse_url: str) -> bool:
    """Whether a process runs the embedded engine on this ``chdb://`` folder: while it runs, the
    engine holds a lock (``flock``) on ``<folder>/status``. chdb's own error on opening a held
    folder does not say so ("Error initializing EmbeddedServer")."""
    folder = _folder(clickhouse_url)
    if folder is None:
        return False
    try:
        fd = os.open(folder / "status", os.O_RDONLY)
    except OSError:  # no status file: no engine ever ran there, or it stopped cleanly
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the probe's lock, if it got one
    return False


@dataclass(frozen=True)
class EngineHolder:
    """The process that holds an embedded engine's folder."""

    pid: int
    argv: tuple[str, ...]  # its command line ((): not readable)
    #: what it recorded in the folder (:func:`record_holder`): its command, host and port
    recorded: tuple[str, str, int] | None = None

    @property
    def command(self) -> str | None:
        """``up``, ``api``, ``worker``... when it is a ``metering`` command, else None."""
        if self.recorded is not None:
            return self.recorded[0]
        for i, arg in enumerate(self.argv):
            if arg.endswith(("metering", "metering.cli")) and i + 1 < len(self.argv):
                return self.argv[i + 1]
        return None

    def _flag(self, name: str, default: str) -> str:
        for i, arg in enumerate(self.argv):
            if arg == name and i + 1 < len(self.argv):
                return self.argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return default

    @property
    def api_url(self) -> str | None:
        """Where it answers HTTP, when it is ``metering up`` or ``metering api`` (their
        ``--host`` / ``--port``, default 127.0.0.1:8000; a wildcard host is asked on
        loopback)."""
        if self.command not in ("up", "api"):
            return None
        if self.recorded is not None:
            host, port = self.recorded[1], str(self.recorded[2])
        else:
            host, port = self._flag("--host", "127.0.0.1"), self._flag("--port", "8000")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def describe(self) -> str:
        named = f"`metering {self.command}`" if self.command else "another process"
        return f"{named} (pid {self.pid})"


#: The file in the engine's folder where a `metering up` or `metering api` names itself
#: (:func:`record_holder`).
_HOLDER_FILE = "metering-holder-{pid}.json"


def record_holder(clickhouse_url: str, command: str, host: str, port: int) -> Path | None:
    """Record in the embedded engine's folder of ``clickhouse_url`` that this process is
    ``metering <command>`` serving HTTP on ``host:port`` (nothing for a ClickHouse server);
    return the file, for :func:`forget_holder`.

    Another command that finds the folder held reads it (:func:`embedded_holder`) to ask this
    process's API instead: ``/proc/<pid>/cmdline`` cannot tell, as Faust rewrites the process
    title of `metering up` ("[Faust:Worker] ..."). A folder that cannot be written costs only
    that hint."""
    folder = _folder(clickhouse_url)
    if folder is None:
        return None
    pid = os.getpid()
    path = folder / _HOLDER_FILE.format(pid=pid)
    record = {
        "pid": pid,
        "started": process_identity(pid),
        "command": command,
        "host": host,
        "port": port,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob(_HOLDER_FILE.format(pid="*")):  # those of processes gone
            other = old.name.removeprefix("metering-holder-").removesuffix(".json")
            if other.isdigit() and process_identity(int(other)) is None:
                old.unlink(missing_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(record))
        part.replace(path)
    except OSError:
        return None
    return path


def forget_holder(path: Path | None) -> None:
    """Remove what :func:`record_holder` wrote (the process is stopping)."""
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _recorded(folder: Path, pid: int) -> tuple[str, str, int] | None:
    """What process ``pid`` recorded in ``folder`` (:func:`record_holder`), if it did."""
    try:
        record = json.loads((folder / _HOLDER_FILE.format(pid=pid)).read_text())
    except (OSError, ValueError):
        return None
    started = record.get("started") if isinstance(record, dict) else None
    if started is None or started != process_identity(pid):  # gone, its pid used again
        return None
    command, host, port = record.get("command"), record.get("host"), record.get("port")
    if isinstance(command, str) and isinstance(host, str) and type(port) is int:
        return command, host, port
    return None


def embedded_holder(clickhouse_url: str) -> EngineHolder | None:
    """The process holding this ``chdb://`` folder, or None when none does or this process
    does: the engine writes its pid to ``<folder>/status`` and locks the file while it runs; a
    `metering up` or `metering api` also records what it is (:func:`record_holder`)."""
    folder = _folder(clickhouse_url)
    if folder is None or not embedded_folder_in_use(clickhouse_url):
        return None
    try:
        status = (folder / "status").read_text(errors="replace")
        pid = int(re.search(r"^PID:\s*(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]
    except (OSError, TypeError, ValueError):
        return EngineHolder(0, ())
    if pid == os.getpid():
        return None  # this process runs the engine itself, and shares it
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    except OSError:
        argv = ()
    return EngineHolder(pid, argv, _recorded(folder, pid))


def engine_holder(settings: Settings) -> EngineHolder | None:
    """:func:`embedded_holder` of the settings' ClickHouse (None for a server). A command asks
    it before opening the engine, which prints its own error to stderr when it cannot."""
    return embedded_holder(settings.clickhouse_url) if settings.clickhouse_embedded else None


def embedded_engine_held(settings: Settings, exc: BaseException) -> bool:
    """Whether ``exc`` is the embedded engine refusing to open a folder another process holds
    (this process may hold it itself once it opened it, so only an open failure is asked about)."""
    if not settings.clickhouse_embedded:
        return False
    text = str(exc).lower()
    if "cannot lock file" in text:  # what chdb said before "Error initializing EmbeddedServer"
        return True
    return "unable to open" in text and embedded_folder_in_use(settings.clickhouse_url)


def _detail(exc: BaseException) -> str:
    """The first line of the error: the driver's own for a SQLAlchemy error (the rest is the
    statement and a link)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if isinstance(orig, BaseException) else exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line or type(exc).__name__


def _passwords(settings: Settings) -> set[str]:
    found = {settings.rate_limit_redis_password or ""}
    for url in (settings.rate_limit_redis_url, settings.quota_db_url, settings.clickhouse_url):
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found |= {password, unquote(password)}
    return found - {""}


def _scrubbed(text: str, settings: Settings | None) -> str:
    """``text`` with any URL password in it masked, and the settings' passwords wherever they
    appear (a driver may echo a connection string)."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m[0]), text)
    if settings is not None:
        for password in sorted(_passwords(settings), key=len, reverse=True):
            # As a word of its own: a password "p" must not turn "port" into "***ort".
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(password)}(?![A-Za-z0-9])", MASK, text)
    return text


def redis_setting(settings: Settings | None) -> str:
    """The setting(s) naming the Redis the CLI talks to, with the value (password masked)."""
    if settings is None:
        return "RATE_LIMIT_REDIS_URL"
    if settings.redis_mode == "cluster":
        nodes = ",".join(f"{h}:{p}" for h, p in settings.rate_limit_redis_cluster_nodes)
        return f"RATE_LIMIT_REDIS_CLUSTER_NODES={redact(nodes)}"
    if settings.redis_mode == "sentinel":
        sentinels = ",".join(f"{h}:{p}" for h, p in settings.rate_limit_redis_sentinels)
        return (
            f"RATE_LIMIT_REDIS_SENTINELS={redact(sentinels)}, "
            f"RATE_LIMIT_REDIS_SENTINEL_MASTER={settings.rate_limit_redis_sentinel_master}"
        )
    return f"RATE_LIMIT_REDIS_URL={redact(settings.rate_limit_redis_url)}"


#: a store a newer release migrated (a deploy rolled back): ``found`` and ``known`` say at what
_NEWER = ("metering.quota_db.NewerRevisionError", "metering.clickhouse.schema.NewerSchemaError")
#: the stores and the exception classes their clients raise
_STORE_ERRORS: dict[str, tuple[str, ...]] = {
    "the quota DB": ("sqlalchemy.exc.SQLAlchemyError", "metering.quota_db.NewerRevisionError"),
    "Kafka": ("kafka.errors.KafkaError", "aiokafka.errors.KafkaError"),
    "ClickHouse": (
        "clickhouse_connect.driver.exceptions.Error",
        "chdb.ChdbError",
        "chdb._exceptions.ChdbError",
        "metering.clickhouse.schema.NewerSchemaError",
    ),
    "Redis": ("redis.exceptions.RedisError", "redis.exceptions.RedisClusterException"),
}
#: the setting naming each store (Redis: :func:`redis_setting`)
_SETTING = {
    "the quota DB": "QUOTA_DB_URL",
    "Kafka": "KAFKA_BOOTSTRAP_SERVERS",
    "ClickHouse": "CLICKHOUSE_URL",
}


def _setting(store: str, settings: Settings | None) -> str:
    if store == "Redis":
        return redis_setting(settings)
    name = _SETTING[store]
    if settings is None:  # the settings themselves do not load: name the variable only
        return name
    return f"{name}={redact(str(getattr(settings, name.lower())))}"


def failing_store(exc: BaseException) -> str | None:
    """The store whose client raised ``exc`` ("the quota DB", "Kafka", "ClickHouse", "Redis"),
    or None when no store's client did."""
    return next(
        (s for s, names in _STORE_ERRORS.items() if isinstance(exc, _classes(*names))), None
    )


def store_failure(exc: BaseException, settings: Settings | None = None) -> str | None:
    """The one-line message for ``exc`` if a store's client raised it, else None. ``settings``:
    those the failing code ran with (an app built with its own); default: the environment's."""
    store = failing_store(exc)
    if store is None:
        return None
    if settings is None:
        try:
            settings = load_settings()
        except Exception:
            settings = None
    where = f"{store} ({_setting(store, settings)})"
    if isinstance(exc, _classes(*_NEWER)):
        found, known = getattr(exc, "found", "?"), getattr(exc, "known", "?")
        return f"{where} is at {found}, newer than this release knows ({known}): {NEWER_HINT}"
    if store == "ClickHouse" and settings is not None and embedded_engine_held(settings, exc):
        return f"{where}: cannot open the embedded engine: {FOLDER_IN_USE}"
    detail = _detail(exc)
    hint = f"; {MIGRATE_HINT}" if _UNMIGRATED.search(detail) else ""
    detail = _scrubbed(detail, settings)  # before it is cut: no password cut in half
    if len(detail) > MAX_DETAIL:
        detail = detail[: MAX_DETAIL - 1] + "…"
    return f"{where}: {detail}{hint}"


__all__ = [
    "FOLDER_IN_USE",
    "MIGRATE_HINT",
    "NEWER_HINT",
    "embedded_engine_held",
    "embedded_folder_in_use",
    "failing_store",
    "forget_holder",
    "record_holder",
    "redis_setting",
    "store_failure",
]
