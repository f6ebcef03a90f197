"""The local service stack: real servers as plain processes on loopback, without Docker.

- Redis: Debian's ``redis-server``; on request a 3-master Cluster and a Sentinel group
  (1 master, 1 replica, 3 sentinels).
- Kafka: Apache Kafka in KRaft mode (one broker acting as its own controller), from the official
  jars on Maven Central, resolved once with Maven into a cache folder and reused after.
- PostgreSQL: Debian's, a throw-away cluster in a temporary folder, on request.
- ClickHouse: the embedded engine (chdb); it has no process, only a data folder.

State (PIDs, ports, folders) lives in ``<root>/state.json``. ``up`` is idempotent: a service whose
processes are alive and answering is left alone. ``down`` stops exactly the processes ``up``
started: each PID is recorded with its process's identity (boot and start time), and a PID that
names another process by now (after a reboot, or the server died and its PID was reused) is
never signalled. An entry written before identities were recorded is trusted only while its
PID's command line still names the service's server and its port or folder.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SERVICES = ("redis", "kafka", "postgres", "redis-cluster", "redis-sentinel")
DEFAULT_SERVICES = ("redis", "kafka")
PREFERRED_PORTS: dict[str, list[int]] = {
    "redis": [6379],
    "kafka": [9092, 9093],
    "postgres": [55432],
    "redis-cluster": [7000, 7001, 7002],
    "redis-sentinel": [6380, 6381, 26379, 26380, 26381],
}
MEMBERS: dict[str, list[str]] = {
    "redis": ["redis"],
    "kafka": ["broker", "controller"],
    "postgres": ["postgres"],
    "redis-cluster": ["node0", "node1", "node2"],
    "redis-sentinel": ["master", "replica", "sentinel0", "sentinel1", "sentinel2"],
}
SENTINEL_MASTER = "mymaster"
PACKAGE_HINTS = {
    "redis-server": "Debian package 'redis-server' (apt-get install redis-server)",
    "redis-cli": "Debian package 'redis-tools' (apt-get install redis-tools)",
    "java": "a JDK 17 (apt-get install openjdk-17-jre-headless)",
    "mvn": "Maven (apt-get install maven)",
    "initdb": "Debian package 'postgresql' (apt-get install postgresql)",
    "postgres": "Debian package 'postgresql' (apt-get install postgresql)",
}


class StackError(RuntimeError):
    """A local service could not be started, found or reached; the message says what to do."""


@dataclass
class ServiceState:
    name: str
    pids: dict[str, int] = field(default_factory=dict)  # member name -> pid
    ports: dict[str, int] = field(default_factory=dict)  # member name -> port
    paths: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    #: member name -> :func:`process_identity` of its process when it was started (absent in
    #: a state file written by an older version: see :func:`recorded_alive`)
    identities: dict[str, str] = field(default_factory=dict)


# Children started by this Python process, so a dead one is reaped instead of lingering as a
# zombie that still "exists" for os.kill(pid, 0).
_children: dict[int, subprocess.Popen[bytes]] = {}


def find_binary(name: str, extra_dirs: Iterable[str] = ()) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        for cand in sorted(Path("/").glob(d.lstrip("/")), reverse=True):
            p = cand / name
            if p.exists():
                return str(p)
    raise StackError(f"'{name}' was not found on PATH: install {PACKAGE_HINTS.get(name, name)}")


def processes_naming(text: str) -> list[str]:
    """``pid: cmdline`` of every live process (this one aside) whose command line contains
    ``text``: what a run that should have stopped everything it started left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def pid_alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            _children.pop(pid, None)
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@functools.cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_identity(pid: int) -> str | None:
    """What tells the process now running as ``pid`` from any other that had or will have that
    PID: the boot it runs in and its start time (clock ticks after boot, field 22 of
    ``/proc/<pid>/stat``). None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{_boot_id()}:{stat.rsplit(')', 1)[1].split()[19]}"


def _is(pid: int, identity: str | None) -> bool:
    """``pid`` is alive and, when ``identity`` is given, still that process."""
    return pid_alive(pid) and (not identity or process_identity(pid) == identity)


def _send(pid: int, sig: int, identity: str | None) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process ``identity`` names; False when it is
    gone or another one. Through a pidfd where the kernel has them: the identity is checked on
    the process the pidfd holds, so a PID reused in between is never signalled."""
    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd_open here: check, then signal by PID
        fd = None
    try:
        if identity and process_identity(pid) != identity:
            return False
        if fd is None:
            os.kill(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def stop_pid(
    pid: int, timeout: float = 15.0, sig: int = signal.SIGTERM, identity: str | None = None
) -> bool:
    """Signal ``pid``, wait for it to exit, SIGKILL it after ``timeout``. True when it exited by
    itself (or was not running), False when it had to be killed. With ``identity`` (its
    :func:`process_identity` when it was started) only that process is signalled: a PID that
    names another process by now counts as not running."""
    if not _is(pid, identity) or not _send(pid, sig, identity):
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is(pid, identity):
            return True
        time.sleep(0.05)
    _send(pid, signal.SIGKILL, identity)
    deadline = time.monotonic() + 5
    while _is(pid, identity) and time.monotonic() < deadline:
        time.sleep(0.05)
    return False


#: what the command line of each service's server holds (for entries without an identity)
SERVER_PROGRAMS = {
    "redis": "redis-server",
    "redis-cluster": "redis-server",
    "redis-sentinel": "redis-server",
    "kafka": "kafka.Kafka",
    "postgres": "postgres",
}


def recorded_alive(st: ServiceState, member: str) -> bool:
    """The process recorded for ``member`` still runs: its PID is alive and names the same
    process (:func:`process_identity`). An entry written before identities were recorded is
    taken for its server only while the PID's command line names the service's program and the
    member's port or one of the service's folders, as the servers started here do (Redis shows
    ``127.0.0.1:<port>``, Kafka its ``server.properties``, PostgreSQL its data folder); any
    other process is not it, and is never signalled."""
    pid = st.pids.get(member)
    if pid is None or not pid_alive(pid):
        return False
    identity = st.identities.get(member)
    if identity:
        return process_identity(pid) == identity
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    words = cmdline.split("\0")
    port = st.ports.get(member)
    names_port = port is not None and any(
        w == str(port) or w.endswith(f":{port}") for w in " ".join(words).split()
    )
    names_path = any(p and p in words for p in st.paths.values())
    program = SERVER_PROGRAMS.get(st.name)
    return program is not None and program in cmdline and (names_port or names_path)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:
            last = exc
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = (
            "\n--- last lines of "
            + str(log)
            + " ---\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        )
    raise StackError(f"{what} did not answer within {timeout:.0f}s (last error: {last!r}){tail}")


def redis_ping(port: int) -> bool:
    return bool(redis_command(port, "PING"))


def redis_command(port: int, *args: str, timeout: float = 1.0) -> Any:
    import redis

    client = redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
    )
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def kafka_cache_dir() -> Path:
    base = os.environ.get("METERING_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "metering"
    )
    return Path(base)


def kafka_version() -> str:
    pom = resources.files("metering.localstack").joinpath("kafka-pom.xml").read_text()
    start = pom.index("<kafka.version>") + len("<kafka.version>")
    return pom[start : pom.index("</kafka.version>")]


def ensure_kafka_jars(quiet: bool = True) -> Path:
    """Resolve Kafka's jars with Maven into the cache folder (first time only); return it."""
    version = kafka_version()
    libs = kafka_cache_dir() / f"kafka-{version}" / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = find_binary("mvn")
    find_binary("java")
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    with resources.as_file(resources.files("metering.localstack").joinpath("kafka-pom.xml")) as pom:
        cmd = [
            mvn,
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-Dmdep.includeScope=runtime",
        ]
        if quiet:
            cmd.insert(1, "-q")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise StackError(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{version}:\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    (staging / ".complete").write_text(version)
    if libs.exists():
        shutil.rmtree(libs)
    staging.rename(libs)
    return libs


def class_data_archive(java: str, libs: Path, role: str) -> Path:
    """Where the class-data archive of Kafka's classes for ``role`` (``broker``, ``format``)
    lives: in the cache folder, named after the JDK and the jars, so another JDK or re-resolved
    jars get an archive of their own instead of one the JVM would refuse."""
    real = Path(java).resolve()
    parts = [str(real)]
    for f in (real, real.parent.parent / "lib" / "server" / "libjvm.so", libs / ".complete"):
        with contextlib.suppress(OSError):
            st = f.stat()
            parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    return libs.parent / "cds" / f"{role}-{key}.jsa"


def class_data_flags(archive: Path) -> tuple[list[str], Path | None]:
    """JVM flags that load Kafka's classes from ``archive`` (AppCDS: the start skips most class
    loading and verification) when it exists. Otherwise flags that make this JVM write one when
    it exits, to a temporary name returned for :func:`adopt_class_data`. A stale or unreadable
    archive is ignored by the JVM (``-Xshare:auto``), never an error."""
    quiet = "-Xlog:cds*=off"
    if archive.exists():
        return [f"-XX:SharedArchiveFile={archive}", "-Xshare:auto", quiet], None
    archive.parent.mkdir(parents=True, exist_ok=True)
    dump = archive.with_name(f"{archive.stem}.{uuid.uuid4().hex[:8]}.tmp")
    return [f"-XX:ArchiveClassesAtExit={dump}", quiet], dump


def adopt_class_data(dump: Path | None, archive: Path, exited_cleanly: bool) -> None:
    """Publish the archive a JVM wrote at exit (atomically; concurrent writers each publish a
    whole one), or drop it when the JVM was killed and it may be incomplete."""
    if dump is None:
        return
    if exited_cleanly and dump.exists() and dump.stat().st_size > 0:
        os.replace(dump, archive)
    else:
        dump.unlink(missing_ok=True)


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes them (URL-safe base64 of 16 bytes), never starting
    with '-': kafka-storage would read that as an option and refuse to format."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class LocalStack:
    """Real servers as processes under one root folder, described by ``<root>/state.json``."""

    def __init__(
        self, root: Path | str, *, kafka_heap: str = "768m", kafka_auto_create_topics: bool = True
    ) -> None:
        self.root = Path(root).resolve()
        self.kafka_heap = kafka_heap
        #: False: a producer cannot create a topic by naming it (the pipeline's topics are made
        #: with their partitions by ``ensure_topics``; events for a topic not made yet wait).
        self.kafka_auto_create_topics = kafka_auto_create_topics
        self.state_file = self.root / "state.json"

    # --- state ---------------------------------------------------------------------------------
    def _load(self) -> dict[str, ServiceState]:
        if not self.state_file.exists():
            return {}
        raw = json.loads(self.state_file.read_text())
        known = set(ServiceState.__dataclass_fields__)
        return {
            k: ServiceState(**{f: x for f, x in v.items() if f in known}) for k, v in raw.items()
        }

    def _save(self, state: dict[str, ServiceState]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in state.items()}, indent=2))
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def service(self, name: str) -> ServiceState | None:
        return self._load().get(name)

    # --- public operations ---------------------------------------------------------------------
    def up(
        self, services: Iterable[str] = DEFAULT_SERVICES, timeout: float = 60.0
    ) -> dict[str, str]:
        """Start each service that is not already running and answering (in parallel); wait
        until all answer; return their settings."""
        return self.start(services, timeout).wait()

    def start(
        self, services: Iterable[str] = DEFAULT_SERVICES, timeout: float = 60.0
    ) -> StackStart:
        """Begin starting each service that is not already running and answering, each in a
        thread of its own, and return at once: the ports are chosen first, so the settings
        (:attr:`StackStart.env`) are known before any server answers. The stack stays locked
        until :meth:`StackStart.wait` returns."""
        wanted = list(dict.fromkeys(services))
        for name in wanted:
            if name not in SERVICES:
                raise StackError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")
        held = contextlib.ExitStack()  # the stack's lock, released by StackStart.wait
        held.enter_context(self._locked())
        try:
            state = self._load()
            taken = {p for st in state.values() for p in st.ports.values()}
            jobs: dict[str, tuple[ServiceState, ServiceState | None]] = {}
            for name in wanted:
                current = state.get(name)
                if current is not None and self._healthy(current):
                    for member, pid in current.pids.items():  # an older version's entry
                        current.identities.setdefault(member, process_identity(pid) or "")
                    continue
                if current is not None:
                    self._stop(current)
                st = ServiceState(name, started_at=time.time())
                st.ports = self._ports(name, current, MEMBERS[name], taken)
                taken |= set(st.ports.values())
                state[name] = st
                jobs[name] = (st, current)
            pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, len(jobs)), thread_name_prefix="localstack-start"
            )
            futures = {
                name: pool.submit(self._start, st, previous, timeout)
                for name, (st, previous) in jobs.items()
            }
            pool.shutdown(wait=False)
        except BaseException:
            held.close()
            raise
        return StackStart(self, state, futures, held, wanted)

    def down(self, services: Iterable[str] | None = None) -> list[str]:
        """Stop the processes ``up`` started (by PID); return the services stopped."""
        with self._locked():
            state = self._load()
            names = list(services) if services is not None else list(state)
            stopped = []
            for name in names:
                st = state.pop(name, None)
                if st is None:
                    continue
                self._stop(st)
                stopped.append(name)
            self._save(state)
            return stopped

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, st in self._load().items():
            out[name] = {
                "running": {m: recorded_alive(st, m) for m in st.pids},
                "ports": st.ports,
                "healthy": self._healthy(st),
            }
        return out

    def env(
        self,
        state: dict[str, ServiceState] | None = None,
        services: Iterable[str] | None = None,
    ) -> dict[str, str]:
        """The settings (environment variables) that point the product at this stack, or at
        only the named ``services`` of it."""
        state = self._load() if state is None else state
        if services is not None:
            keep = set(services)
            state = {name: st for name, st in state.items() if name in keep}
        env: dict[str, str] = {"METERING_DATA_DIR": str(self.root.parent)}
        if "redis" in state:
            env["RATE_LIMIT_REDIS_URL"] = f"redis://127.0.0.1:{state['redis'].ports['redis']}/0"
        if "kafka" in state:
            env["KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{state['kafka'].ports['broker']}"
        if "postgres" in state:
            env["QUOTA_DB_URL"] = (
                f"postgresql+psycopg://postgres@127.0.0.1:{state['postgres'].ports['postgres']}/postgres"
            )
        if "redis-cluster" in state:
            env["RATE_LIMIT_REDIS_CLUSTER_NODES"] = ",".join(
                f"127.0.0.1:{p}" for p in state["redis-cluster"].ports.values()
            )
        if "redis-sentinel" in state:
            st = state["redis-sentinel"]
            env["RATE_LIMIT_REDIS_SENTINELS"] = ",".join(
                f"127.0.0.1:{p}" for m, p in st.ports.items() if m.startswith("sentinel")
            )
            env["RATE_LIMIT_REDIS_SENTINEL_MASTER"] = SENTINEL_MASTER
        return env

    def kill(self, service: str, member: str, sig: int = signal.SIGKILL) -> int:
        """Kill one member process of a service (for failure tests); return its PID."""
        st = self._load()[service]
        pid = st.pids[member]
        if recorded_alive(st, member):
            identity = st.identities.get(member) or process_identity(pid)
            stop_pid(pid, timeout=10, sig=sig, identity=identity)
        return pid

    def restart_member(self, service: str, member: str, timeout: float = 60.0) -> None:
        """Start a member that was killed again, on the same port and data (failure tests).

        A member still running is refused: a second server could not bind its port, the old one
        would go on answering, and its PID would be forgotten (left running after ``down``)."""
        with self._locked():
            state = self._load()
            st = state[service]
            old = st.pids.get(member)
            if old is not None and recorded_alive(st, member):
                raise StackError(
                    f"{service}/{member} (pid {old}) is still running: kill it before restarting"
                )
            if service == "kafka":
                self._adopt(st, member, self._spawn_kafka(st))
                wait_until(
                    lambda: self._kafka_ready(st.ports["broker"]),
                    timeout,
                    "Kafka",
                    Path(st.paths["log"]),
                )
            elif service in {"redis", "redis-sentinel", "redis-cluster"}:
                argv = json.loads(st.paths[f"argv:{member}"])
                self._adopt(st, member, self._spawn(argv, Path(st.paths[f"log:{member}"])))
                wait_until(lambda: redis_ping(st.ports[member]), timeout, f"{service}/{member}")
            else:
                raise StackError(f"restart of {service}/{member} is not supported")
            self._save(state)

    # --- per-service start ---------------------------------------------------------------------
    def _ports(
        self,
        name: str,
        previous: ServiceState | None,
        members: list[str],
        taken: set[int] | None = None,
    ) -> dict[str, int]:
        """Ports for a service's members: its previous ones, else the preferred ones, else free
        ones; never one in ``taken`` (chosen for a service starting alongside)."""
        taken = taken or set()

        def usable(p: int) -> bool:
            return p not in taken and port_free(p)

        if (
            previous is not None
            and set(previous.ports) == set(members)
            and all(usable(p) for p in previous.ports.values())
        ):
            return dict(previous.ports)
        preferred = PREFERRED_PORTS[name]
        if all(usable(p) for p in preferred):
            return dict(zip(members, preferred, strict=True))
        ports: dict[str, int] = {}
        for m in members:
            p = free_port()
            # A Cluster node also listens on port + 10000 (its bus), so it needs both free.
            while (
                p in ports.values()
                or p in taken
                or (name == "redis-cluster" and (p > 55535 or not port_free(p + 10000)))
            ):
                p = free_port() if name != "redis-cluster" else random.randint(20000, 45000)
                if not port_free(p):
                    continue
            ports[m] = p
        return ports

    def _start(self, st: ServiceState, previous: ServiceState | None, timeout: float) -> None:
        """Start ``st`` (ports already chosen) and wait until it answers; on any failure stop
        what was started of it and raise."""
        starter = {
            "redis": self._start_redis,
            "kafka": self._start_kafka,
            "postgres": self._start_postgres,
            "redis-cluster": self._start_cluster,
            "redis-sentinel": self._start_sentinel,
        }[st.name]
        try:
            starter(st, previous, timeout)
        except BaseException:
            self._stop(st)  # never leave a half-started service's processes behind
            raise

    def _spawn(
        self, argv: list[str], log: Path, user: str | None = None, cwd: Path | None = None
    ) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd,
                user=user,
            )
        _children[proc.pid] = proc
        return proc.pid

    def _adopt(self, st: ServiceState, member: str, pid: int) -> None:
        """Record ``pid``, just spawned, as ``member`` of ``st`` with its identity: read now,
        while it is this process's unreaped child, its PID cannot name another process yet."""
        st.pids[member] = pid
        st.identities[member] = process_identity(pid) or ""

    def _redis_argv(self, port: int, data: Path, *extra: str) -> list[str]:
        return [
            find_binary("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            *extra,
        ]

    def _start_redis_member(self, st: ServiceState, member: str, argv: list[str]) -> None:
        log = self.root / st.name / f"{member}.log"
        st.paths[f"argv:{member}"] = json.dumps(argv)
        st.paths[f"log:{member}"] = str(log)
        self._adopt(st, member, self._spawn(argv, log))

    def _start_redis(self, st: ServiceState, previous: ServiceState | None, timeout: float) -> None:
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self._start_redis_member(st, "redis", self._redis_argv(st.ports["redis"], data))
        wait_until(
            lambda: redis_ping(st.ports["redis"]),
            timeout,
            "redis-server",
            Path(st.paths["log:redis"]),
        )

    def _start_cluster(
        self, st: ServiceState, previous: ServiceState | None, timeout: float
    ) -> None:
        members = MEMBERS["redis-cluster"]
        base = self.root / "redis-cluster"
        shutil.rmtree(base, ignore_errors=True)  # a cluster is rebuilt from scratch each start
        for m in members:
            data = base / m
            data.mkdir(parents=True, exist_ok=True)
            argv = self._redis_argv(
                st.ports[m],
                data,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(data / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            )
            self._start_redis_member(st, m, argv)
        for m in members:
            wait_until(functools.partial(redis_ping, st.ports[m]), timeout, f"redis cluster {m}")
        cli = find_binary("redis-cli")
        addrs = [f"127.0.0.1:{st.ports[m]}" for m in members]
        proc = subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")

        def cluster_ok() -> bool:
            return all(
                "cluster_state:ok" in redis_command(st.ports[m], "CLUSTER", "INFO") for m in members
            )

        wait_until(cluster_ok, timeout, "redis cluster (cluster_state:ok)")

    def _start_sentinel(
        self, st: ServiceState, previous: ServiceState | None, timeout: float
    ) -> None:
        base = self.root / "redis-sentinel"
        shutil.rmtree(base, ignore_errors=True)  # sentinels rewrite their config: start clean
        for m in ("master", "replica"):
            (base / m).mkdir(parents=True, exist_ok=True)
        self._start_redis_member(
            st, "master", self._redis_argv(st.ports["master"], base / "master")
        )
        self._start_redis_member(
            st,
            "replica",
            self._redis_argv(
                st.ports["replica"],
                base / "replica",
                "--replicaof",
                "127.0.0.1",
                str(st.ports["master"]),
            ),
        )
        for m in ("master", "replica"):
            wait_until(
                functools.partial(redis_ping, st.ports[m]), timeout, f"redis sentinel group {m}"
            )

        def replica_synced() -> bool:
            info = redis_command(st.ports["replica"], "INFO", "replication")
            return bool(info.get("master_link_status") == "up")

        wait_until(replica_synced, timeout, "replica sync")
        for i in range(3):
            m = f"sentinel{i}"
            d = base / m
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {st.ports[m]}\nbind 127.0.0.1\nprotected-mode no\ndir {d}\n"
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {st.ports['master']} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 3000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            self._start_redis_member(st, m, [find_binary("redis-server"), str(conf), "--sentinel"])
        for i in range(3):
            port = st.ports[f"sentinel{i}"]

            def knows_replica(port: int = port) -> bool:
                replicas = redis_command(port, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
                others = redis_command(port, "SENTINEL", "SENTINELS", SENTINEL_MASTER)
                return len(replicas) >= 1 and len(others) >= 2

            wait_until(knows_replica, timeout, f"sentinel{i}")

    def _kafka_ready(self, port: int) -> bool:
        from kafka import KafkaAdminClient

        # A plain connect first: kafka-python logs every refused bootstrap at ERROR level.
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass

        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}",
            request_timeout_ms=3000,
            client_id="metering-localstack",
        )
        try:
            admin.list_topics()
            return True
        finally:
            admin.close()

    def _spawn_kafka(self, st: ServiceState) -> int:
        libs = Path(st.paths["libs"])
        log4j = resources.files("metering.localstack").joinpath("log4j2.xml")
        java = find_binary("java")
        archive = class_data_archive(java, libs, "broker")
        cds, dump = class_data_flags(archive)
        st.paths["cds_archive"] = str(archive)
        st.paths["cds_dump"] = str(dump) if dump else ""
        argv = [
            java,
            "-Xms256m",
            f"-Xmx{self.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            *cds,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            st.paths["config"],
        ]
        return self._spawn(argv, Path(st.paths["log"]))

    def _start_kafka(self, st: ServiceState, previous: ServiceState | None, timeout: float) -> None:
        libs = ensure_kafka_jars()
        base = self.root / "kafka"
        data = base / "data"
        base.mkdir(parents=True, exist_ok=True)
        broker, controller = st.ports["broker"], st.ports["controller"]
        config = base / "server.properties"
        config.write_text(
            "process.roles=broker,controller\nnode.id=1\n"
            f"controller.quorum.voters=1@127.0.0.1:{controller}\n"
            f"listeners=PLAINTEXT://127.0.0.1:{broker},CONTROLLER://127.0.0.1:{controller}\n"
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{broker}\n"
            "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n"
            f"log.dirs={data}\nnum.partitions=1\n"
            f"auto.create.topics.enable={str(self.kafka_auto_create_topics).lower()}\n"
            "offsets.topic.replication.factor=1\noffsets.topic.num.partitions=10\n"
            "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
            "share.coordinator.state.topic.replication.factor=1\n"
            "share.coordinator.state.topic.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\nlog.retention.hours=168\n"
            "num.network.threads=2\nnum.io.threads=4\n"
        )
        st.paths.update(
            libs=str(libs), config=str(config), log=str(base / "kafka.log"), data=str(data)
        )
        if not (data / "meta.properties").exists():
            java = find_binary("java")
            archive = class_data_archive(java, libs, "format")
            cds, dump = class_data_flags(archive)
            # A one-shot tool: C1 only and the serial collector start sooner than the defaults.
            proc = subprocess.run(
                [
                    java,
                    "-Xmx256m",
                    "-XX:TieredStopAtLevel=1",
                    "-XX:+UseSerialGC",
                    *cds,
                    "-cp",
                    f"{libs}/*",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    _kafka_cluster_id(),
                    "-c",
                    str(config),
                    "--ignore-formatted",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            adopt_class_data(dump, archive, proc.returncode == 0)
            if proc.returncode != 0:
                raise StackError(f"kafka storage format failed: {proc.stdout}{proc.stderr}")
        self._adopt(st, "broker", self._spawn_kafka(st))
        wait_until(
            lambda: self._kafka_ready(broker), timeout, "Kafka broker", Path(st.paths["log"])
        )

    def _start_postgres(
        self, st: ServiceState, previous: ServiceState | None, timeout: float
    ) -> None:
        pg_dirs = ["/usr/lib/postgresql/*/bin"]
        initdb = find_binary("initdb", pg_dirs)
        postgres = find_binary("postgres", pg_dirs)
        user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as its own user
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise StackError(
                    "running as root needs the 'postgres' user: apt-get install postgresql"
                ) from None
            user = "postgres"
        data = Path(tempfile.mkdtemp(prefix="metering-pg-"))
        os.chmod(data, 0o700)
        if user:
            shutil.chown(data, user, user)
        log = self.root / "postgres" / "postgres.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
            text=True,
            check=False,
            user=user,
        )
        if proc.returncode != 0:
            shutil.rmtree(data, ignore_errors=True)
            raise StackError(f"initdb failed: {proc.stdout}{proc.stderr}")
        port = st.ports["postgres"]
        argv = [
            postgres,
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
        ]
        if user:
            with contextlib.suppress(OSError):
                log.touch()
                shutil.chown(log, user, user)
        st.paths.update(data=str(data), log=str(log))
        self._adopt(st, "postgres", self._spawn(argv, log, user=user))

        def ready() -> bool:
            import psycopg

            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ) as conn:
                conn.execute("SELECT 1")
            return True

        wait_until(ready, timeout, "PostgreSQL", log)

    # --- health and stop -----------------------------------------------------------------------
    def _healthy(self, st: ServiceState) -> bool:
        if not st.pids or not all(recorded_alive(st, m) for m in st.pids):
            return False
        try:
            if st.name == "kafka":
                return self._kafka_ready(st.ports["broker"])
            if st.name == "postgres":
                with socket.create_connection(("127.0.0.1", st.ports["postgres"]), timeout=1):
                    return True
            return all(redis_ping(p) for p in st.ports.values())
        except Exception:
            return False

    def _stop(self, st: ServiceState) -> None:
        # Sentinels first, so they do not fail over a master that is merely being stopped.
        order = sorted(st.pids.items(), key=lambda kv: not kv[0].startswith("sentinel"))
        for member, pid in order:
            clean = True
            if recorded_alive(st, member):  # else gone: its PID may name another process now
                clean = stop_pid(
                    pid,
                    sig=signal.SIGINT if st.name == "postgres" else signal.SIGTERM,
                    identity=st.identities.get(member) or process_identity(pid),
                )
            if st.name == "kafka" and st.paths.get("cds_dump"):
                # The broker's first start writes its class-data archive as it exits.
                adopt_class_data(Path(st.paths["cds_dump"]), Path(st.paths["cds_archive"]), clean)
        if st.name == "postgres" and st.paths.get("data"):
            shutil.rmtree(st.paths["data"], ignore_errors=True)


class StackStart:
    """Services being started by :meth:`LocalStack.start`. The settings of those asked for are
    known at once (:attr:`env`); :meth:`ready` waits for one, :meth:`wait` for all, records them
    and unlocks the stack. A service that failed is stopped and left out of the stack's state."""

    def __init__(
        self,
        stack: LocalStack,
        state: dict[str, ServiceState],
        futures: dict[str, concurrent.futures.Future[None]],
        lock: contextlib.ExitStack,
        services: Iterable[str],
    ) -> None:
        self.stack = stack
        self.started = list(futures)  #: the services this call starts (not those already up)
        #: the settings of the services asked for (not of others the stack may also run)
        self.env = stack.env(state, services)
        self._state = state
        self._futures = futures
        self._lock = lock
        self._finished = False
        self._result: dict[str, str] | None = None
        self._recorded = {name: threading.Event() for name in futures}
        self._mutex = threading.Lock()
        for name, future in futures.items():
            future.add_done_callback(functools.partial(self._record, name))

    def _record(self, name: str, _future: Any = None) -> None:
        """Write the state of every service that answers so far, so ``env()`` (another process,
        e.g. the demo) finds a service as soon as it answers, before the slower ones."""
        with self._mutex:
            unfinished = {
                n for n, f in self._futures.items() if not f.done() or f.exception() is not None
            }
            with contextlib.suppress(OSError):
                self.stack._save({k: v for k, v in self._state.items() if k not in unfinished})
            self._recorded[name].set()

    def ready(self, service: str, timeout: float | None = None) -> None:
        """Wait until ``service`` answers and is recorded (at once if it was already running);
        raise its StackError if it could not be started."""
        future = self._futures.get(service)
        if future is not None:
            future.result(timeout)
            self._recorded[service].wait(timeout)

    def wait(self) -> dict[str, str]:
        """Wait for every service, record the ones that answer, unlock; return the settings.
        Interrupted (Ctrl-C), it still waits for the starts under way, then stops them."""
        if self._finished:  # waited for already
            if self._result is None:
                raise StackError("the services did not start (see the first error)")
            return self._result
        try:
            concurrent.futures.wait(list(self._futures.values()))
        except BaseException:
            concurrent.futures.wait(list(self._futures.values()))
            for name in self.started:
                st = self._state.pop(name, None)
                if st is not None:
                    self.stack._stop(st)
            self._finish()
            raise
        failed = [n for n, f in self._futures.items() if f.exception() is not None]
        for name in failed:
            self._state.pop(name, None)
        self._finish()
        if failed:
            raise self._futures[failed[0]].exception()  # type: ignore[misc]
        self._result = self.stack.env(self._state)
        return self._result

    def _finish(self) -> None:
        try:
            with self._mutex:
                self.stack._save(self._state)
        finally:
            self._finished = True
            self._lock.close()


def default_root() -> Path:
    from metering.settings import load_settings

    return load_settings().metering_data_dir.resolve() / "stack"


def format_env(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={v}" for k, v in env.items())


__all__ = [
    "DEFAULT_SERVICES",
    "SERVICES",
    "LocalStack",
    "StackError",
    "StackStart",
    "default_root",
    "ensure_kafka_jars",
    "format_env",
    "process_identity",
    "recorded_alive",
    "stop_pid",
]
