"""Fetch a Go toolchain from the Go module proxy into a folder: ``fetch_go_toolchain.py
<version> <dest>``, e.g. ``v0.0.1-go1.24.6.linux-amd64 var/go`` gives ``var/go/bin/go``.

The proxy serves each Go release as the module ``golang.org/toolchain`` (what ``go`` fetches
itself for ``GOTOOLCHAIN``); its zip holds the release under ``golang.org/toolchain@<version>/``.
The zip keeps no file modes, so the programs under ``bin/`` and ``pkg/tool/`` are made
executable. The zip comes over HTTPS from the proxy named by ``GOPROXY`` (its first entry),
by default Google's ``proxy.golang.org``.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

PROXY = os.environ.get("GOPROXY", "https://proxy.golang.org").split(",")[0].rstrip("/")
MODULE = "golang.org/toolchain"


def fetch(version: str, dest: Path) -> Path:
    url = f"{PROXY}/{MODULE}/@v/{version}.zip"
    with urllib.request.urlopen(url, timeout=300) as answer:  # noqa: S310 (a fixed https URL)
        data = answer.read()
    prefix = f"{MODULE}@{version}/"
    dest = dest.resolve()
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.exists() else None) as tmp:
        root = Path(tmp) / "go"
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                rel = Path(info.filename[len(prefix) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise SystemExit(f"unsafe path in the toolchain zip: {info.filename}")
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                if rel.parts[0] == "bin" or rel.parts[:2] == ("pkg", "tool"):
                    target.chmod(0o755)
        if not (root / "bin" / "go").exists():
            raise SystemExit(f"{url} holds no bin/go")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        root.rename(dest)
    return dest / "bin" / "go"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        return 2
    go = fetch(argv[1], Path(argv[2]))
    print(f"fetch_go_toolchain: {go}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
