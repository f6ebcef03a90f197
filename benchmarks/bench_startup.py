"""Start-up benchmark: seconds from launching ``metering up`` until its port answers HTTP and
until ``/readyz`` says ready, when it must start its own local services.

Each run launches ``metering up --port <free port>`` with ``METERING_DATA_DIR`` a fresh temporary
folder and no ``RATE_LIMIT_REDIS_*``, ``KAFKA_BOOTSTRAP_SERVERS``, ``QUOTA_DB_URL`` or
``CLICKHOUSE_URL`` in its environment, so it starts its own Redis and Kafka (on free ports: the
preferred 6379/9092 are taken by any other stack) and uses its default SQLite quota DB and
embedded ClickHouse. Caches are warm: Kafka's jars (and, after the first start, its class-data
archives) are already in ``~/.cache/metering``. A first, unreported run warms them when asked
(``--warmup``).

Figures per run (all from the moment the process is launched):
  answers   the first HTTP response of any status on ``/healthz`` (the port serves HTTP)
  ready     the first ``200`` from ``/readyz``
  worker    the line ``metering up`` prints when the worker is consuming (Kafka up, topics made)
Then it sends SIGINT (Ctrl-C), requires exit code 0 within 60 s, the port closed, and no process
left whose command line names the run's data folder (the local Redis and Kafka).

Baseline in the same run: ``--baseline-ref REF`` runs the same thing with the code of a git
revision (extracted with ``git archive`` and put first on ``PYTHONPATH``).

Run:  python benchmarks/bench_startup.py [--runs 3] [--warmup] [--baseline-ref 97af58c]

Target (issue 9): ``metering up`` answers on its port within 20 s of starting, caches warm.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metering.localstack.stack import processes_naming  # noqa: E402

TARGET_S = 20.0
PACKAGES = ("metering", "streams", "limiter")
STRIPPED = (
    "RATE_LIMIT_REDIS_URL",
    "RATE_LIMIT_REDIS_CLUSTER_NODES",
    "RATE_LIMIT_REDIS_SENTINELS",
    "RATE_LIMIT_REDIS_SENTINEL_MASTER",
    "KAFKA_BOOTSTRAP_SERVERS",
    "QUOTA_DB_URL",
    "CLICKHOUSE_URL",
    "JWT_SECRET",
    "JWT_PUBLIC_KEY",
    "METERING_DATA_DIR",
)


@dataclass
class Run:
    answers: float | None
    ready: float | None
    worker: float | None
    stopped: float
    exit_code: int | None
    leftovers: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(pythonpath: str | None, timeout: float) -> Run:
    data = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env["METERING_DATA_DIR"] = str(data)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log = data.parent / f"{data.name}.log"
    worker_at: list[float] = []
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "metering.cli", "up", "--port", str(port)],
        env=env,
        cwd=data,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def read_output() -> None:
        assert proc.stdout is not None
        with open(log, "w") as out:
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if not worker_at and re.search(r"worker consuming", line):
                    worker_at.append(time.monotonic() - t0)

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    answers = ready = None
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            try:
                if answers is None:
                    client.get(f"{base}/healthz")
                    answers = time.monotonic() - t0
                if client.get(f"{base}/readyz").status_code == 200:
                    ready = time.monotonic() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        while not worker_at and time.monotonic() - t0 < timeout and proc.poll() is None:
            time.sleep(0.05)
    if proc.poll() is not None:
        print(log.read_text()[-3000:], file=sys.stderr)
    stop = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        code: int | None = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
        proc.kill()
        proc.wait()
    stopped = time.monotonic() - stop
    reader.join(5)
    leftovers = processes_naming(str(data))
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            leftovers.append(f"port {port} still answers")
    if code == 0 and not leftovers:
        shutil.rmtree(data, ignore_errors=True)
        log.unlink(missing_ok=True)
    else:
        print(f"  kept {data} and {log} for a look", file=sys.stderr)
    return Run(answers, ready, worker_at[0] if worker_at else None, stopped, code, leftovers)


def fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:5.1f} s"


def series(label: str, pythonpath: str | None, runs: int, timeout: float) -> list[Run]:
    out = []
    for i in range(runs):
        r = one_run(pythonpath, timeout)
        out.append(r)
        print(
            f"{label} run {i + 1}: answers {fmt(r.answers)}  ready {fmt(r.ready)}  "
            f"worker {fmt(r.worker)}  | Ctrl-C -> exit {r.exit_code} in {r.stopped:.1f} s, "
            f"left behind: {r.leftovers or 'nothing'}",
            flush=True,
        )
    return out


def summary(label: str, runs: list[Run]) -> float | None:
    def med(vals: list[float | None]) -> float | None:
        got = [v for v in vals if v is not None]
        return statistics.median(got) if len(got) == len(vals) else None

    answers = med([r.answers for r in runs])
    ready = med([r.ready for r in runs])
    worker = med([r.worker for r in runs])
    worst = max((r.answers or float("inf")) for r in runs)
    clean = all(r.exit_code == 0 and not r.leftovers for r in runs)
    print(
        f"{label}: median answers {fmt(answers)}, ready {fmt(ready)}, worker {fmt(worker)}; "
        f"slowest answer {fmt(worst if worst != float('inf') else None)}; "
        f"clean stop every run: {clean}"
    )
    return answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", action="store_true", help="one unreported run first")
    parser.add_argument("--timeout", type=float, default=90.0)
    parser.add_argument("--baseline-ref", help="also measure this git revision, for comparison")
    args = parser.parse_args()
    if args.warmup:
        one_run(None, args.timeout)
    print(
        f"metering up starting its own Redis and Kafka, caches warm, {args.runs} runs, "
        f"target {TARGET_S:.0f} s"
    )
    now = series("now", None, args.runs, args.timeout)
    answers = summary("now", now)
    if args.baseline_ref:
        tree = Path(tempfile.mkdtemp(prefix="bench-startup-baseline-"))
        archive = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "archive",
                args.baseline_ref,
                "metering",
                "streams",
                "limiter",
            ],
            capture_output=True,
            check=True,
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        base = series(f"baseline {args.baseline_ref}", str(tree), args.runs, args.timeout)
        base_answers = summary(f"baseline {args.baseline_ref}", base)
        if answers and base_answers:
            print(f"answers: {base_answers / answers:.1f}x sooner than the baseline")
        shutil.rmtree(tree, ignore_errors=True)
    if answers is not None:
        print(f"answers vs target: {answers:.1f} s / {TARGET_S:.0f} s = {answers / TARGET_S:.2f}")
    ok = all(r.exit_code == 0 and not r.leftovers for r in now)
    return 0 if ok and answers is not None and answers <= TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
