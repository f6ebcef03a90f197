"""The async limiter over TLS (``rediss://``) and a Unix socket (``unix://``): its protocol takes
over the transport redis-py opened, on asyncio's event loop and on uvloop's (the API's), and
decides exactly as over plain TCP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from limiter import AsyncRateLimiter, Quota
from metering.localstack.stack import free_port, wait_until

QUOTA = Quota(rate_per_sec=1000, burst=1000, daily_limit=10**6)
pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs a local redis-server built with TLS"
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextlib.contextmanager
def redis_server(directory: Path, ready: Callable[[], bool], *args: str) -> Iterator[None]:
    """A throwaway redis-server with ``args`` (no persistence), up until the block ends."""
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", *args,
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(ready, 10, f"redis-server {' '.join(args[:4])}")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server answering TLS only, on a free loopback port; its URL and CA file."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    with redis_server(
        tmp_path,
        lambda: _accepts(port),
        "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    ):  # fmt: skip
        yield f"rediss://127.0.0.1:{port}/0", cert


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server listening on a Unix socket only; its URL."""
    path = tmp_path / "redis.sock"
    with redis_server(
        tmp_path, path.exists, "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"
    ):
        yield f"unix://{path}?db=0"


async def decide(url: str, **options: Any) -> list[int]:
    client = aredis.Redis.from_url(url, socket_timeout=2.0, **options)
    limiter = AsyncRateLimiter(client)
    try:
        decisions = await asyncio.gather(
            *(limiter.acquire("tls-tenant", 1, QUOTA) for _ in range(50))
        )
        assert not any(d.degraded for d in decisions)
        pipe = limiter._batcher._pipe
        assert pipe is not None and pipe.transport.get_protocol() is pipe
        if url.startswith("rediss://"):
            assert pipe.transport.get_extra_info("ssl_object") is not None
        return sorted(d.daily_used for d in decisions)
    finally:
        await client.aclose()


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_decisions_over_tls(tls_redis: tuple[str, Path], run: Callable[[Any], list[int]]) -> None:
    url, ca = tls_redis
    assert run(decide(url, ssl_ca_certs=str(ca))) == list(range(1, 51))
    assert run(decide(url, ssl_ca_certs=str(ca))) == list(range(51, 101))


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_decisions_over_a_unix_socket(unix_redis: str, run: Callable[[Any], list[int]]) -> None:
    assert run(decide(unix_redis)) == list(range(1, 51))
    assert run(decide(unix_redis)) == list(range(51, 101))
