"""The emitter's spool: a bounded, durable, ordered on-disk queue of Kafka records.

While Kafka is unreachable the emitter appends records here and a replayer sends them, oldest
first, when Kafka is back. Invariants (tests: ``tests/unit/test_events_spool.py``):

- **FIFO**: records are read in the order they were appended. A record leaves the spool only
  through :meth:`Spool.commit` of a batch the reader has had acknowledged by Kafka, so a crash
  between delivery and commit resends it (the same event id: a duplicate the pipeline drops).
- **Durable**: :meth:`Spool.append` writes the whole batch and fsyncs before it returns; the read
  cursor is replaced atomically (write, fsync, rename). Records survive a process restart.
- **Bounded**: an append never takes the segment files past ``max_bytes`` on disk; they hold
  the pending records and the spent head of the oldest segment, which stays until the reader is
  past its end (:attr:`Spool.used_bytes`). ``append`` accepts the longest prefix that fits and
  returns its length, and the caller counts the rest as dropped. Segments roll at an eighth of
  ``max_bytes`` at most, so spent records take about that share of the room at most.
- **Recoverable**: a record torn by a crash mid-append, or corrupted, fails its length/CRC check
  on open and is cut off with every record after it in its segment. Each cut is logged and kept
  in :attr:`Spool.cuts` (with the number of records cut when the intact records after the
  damaged one tell it), for the owner to count as dropped.
- **One owner**: a directory is locked (``flock``) by one process at a time.

Layout: ``<dir>/LOCK``, ``<dir>/cursor`` (``segment offset``), ``<dir>/<segment:020d>.seg``.
A record is a header (value length u32, key length u16, CRC-32 of key+value u32), the key, the
value. Segments roll at ``segment_bytes`` (at most ``max_bytes // 8``); fully read segments are
deleted on commit.

Why not ``persist-queue``: its file queue is bounded by item count only (and blocks or raises
when full), has no read-then-acknowledge (an item handed out is gone from the queue's point of
view until ``task_done``, with no way to read it again after a failed send), and pickles by
default; its SQLite ack-queue commits per item, which cannot keep up with a request path's event
rate while Kafka is down. Batched appends with one fsync per batch are what this needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">IHI")
MAX_KEY_BYTES = 0xFFFF
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024

Record = tuple[bytes, bytes]  # (key, value)


class SpoolLocked(RuntimeError):
    """The spool directory is in use by another process."""


@dataclass(frozen=True)
class SpoolCut:
    """A damaged stretch cut from the end of a segment on open: ``nbytes`` bytes from
    ``offset``; ``records`` is how many records they held (the damaged one and the intact ones
    after it), or None when that cannot be told (a torn tail, or a damaged record length)."""

    segment: int
    offset: int
    nbytes: int
    records: int | None


@dataclass(frozen=True)
class SpoolBatch:
    """Records read from the head of the spool; pass it to :meth:`Spool.commit` once delivered."""

    records: list[Record]
    start: tuple[int, int]
    end: tuple[int, int]
    nbytes: int

    def __len__(self) -> int:
        return len(self.records)


def _segment_name(segment: int) -> str:
    return f"{segment:020d}.seg"


def _records_in_cut(data: bytes, pos: int) -> int | None:
    """How many records the damaged stretch ``data[pos:]`` holds, or None if it cannot be told.

    The damaged record's CRC failed, so its length fields are trusted only if they lead to
    records whose CRCs hold, chained exactly to the end of the data."""
    count = 0
    while pos + _HEADER.size <= len(data):
        vlen, klen, crc = _HEADER.unpack_from(data, pos)
        body_end = pos + _HEADER.size + klen + vlen
        if body_end > len(data):
            return None
        if count and zlib.crc32(data[pos + _HEADER.size : body_end]) != crc:
            return None
        pos, count = body_end, count + 1
    return count if count and pos == len(data) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A FIFO of ``(key, value)`` records in segment files; thread-safe; one process per dir."""

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
    ) -> None:
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Spent records stay on disk in the head segment until the reader is past its end, and
        # count against max_bytes: a segment larger than the bound would leave no room.
        self.segment_bytes = min(segment_bytes, max(1, max_bytes // 8))
        self.fsync = fsync
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.directory / "LOCK", "a+b")  # noqa: SIM115 - held while open
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLocked(f"spool {self.directory} is in use by another process") from None
        self._ends: dict[int, int] = {}  # segment -> end offset of its last whole record
        self._readers: dict[int, int] = {}  # segment -> fd
        self._pending_events = 0
        self._pending_bytes = 0
        self._closed = False
        #: whether the last append failed to write (a full or failing disk): until one succeeds,
        #: the disk, not ``max_bytes``, bounds what fits (the emitter stops accepting ingest)
        self.write_failed = False
        #: what recovery cut on open (torn or corrupt records): the owner counts them as dropped
        self.cuts: list[SpoolCut] = []
        self._recover()

    # --- state ----------------------------------------------------------------------------------
    @property
    def pending_events(self) -> int:
        return self._pending_events

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes the segment files hold: the pending records and the spent part of the head
        segment (the segments before it are deleted). What counts against ``max_bytes``."""
        return self._head[1] + self._pending_bytes

    def __len__(self) -> int:
        return self._pending_events

    # --- recovery -------------------------------------------------------------------------------
    def _recover(self) -> None:
        head_seg, head_off = self._read_cursor()
        segments = sorted(int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit())
        for seg in [s for s in segments if s < head_seg]:
            (self.directory / _segment_name(seg)).unlink(missing_ok=True)
        segments = [s for s in segments if s >= head_seg]
        if not segments or segments[0] != head_seg:
            head_off = 0
            head_seg = segments[0] if segments else head_seg
        for seg in segments:
            count, start, end = self._scan(seg, head_off if seg == head_seg else 0)
            if seg == head_seg:
                head_off = start
            self._ends[seg] = end
            self._pending_events += count
            self._pending_bytes += end - start
        self._head = (head_seg, head_off)
        self._write_seg = segments[-1] if segments else head_seg
        self._ends.setdefault(self._write_seg, 0)
        self._writer = self._open_segment(self._write_seg)
        os.ftruncate(self._writer, self._ends[self._write_seg])
        if self._pending_events == 0 and head_off > 0:
            self._release_spent()  # nothing left to read (a cut took it): start afresh
        if self._pending_events:
            log.info(
                "spool %s holds %d events (%d bytes) from an earlier run",
                self.directory,
                self._pending_events,
                self._pending_bytes,
            )

    def _scan(self, seg: int, start: int) -> tuple[int, int, int]:
        """Count the whole records of a segment from ``start``; cut a torn or corrupt tail.
        Returns (records, start clamped to the segment, end of the last whole record)."""
        path = self.directory / _segment_name(seg)
        data = path.read_bytes()
        start = min(start, len(data))
        pos, count = start, 0
        while pos + _HEADER.size <= len(data):
            vlen, klen, crc = _HEADER.unpack_from(data, pos)
            body_end = pos + _HEADER.size + klen + vlen
            if body_end > len(data) or zlib.crc32(data[pos + _HEADER.size : body_end]) != crc:
                break
            pos, count = body_end, count + 1
        if pos < len(data):
            cut = SpoolCut(seg, pos, len(data) - pos, _records_in_cut(data, pos))
            self.cuts.append(cut)
            log.warning(
                "spool %s: cut %d bytes (%s records) of a torn or corrupt record and what "
                "follows it at offset %d of %s",
                self.directory,
                cut.nbytes,
                "an unknown number of" if cut.records is None else cut.records,
                pos,
                path.name,
            )
            with open(path, "r+b") as fh:
                fh.truncate(pos)
                os.fsync(fh.fileno())
        return count, start, pos

    def _read_cursor(self) -> tuple[int, int]:
        try:
            seg_s, off_s = (self.directory / "cursor").read_text().split()
            return int(seg_s), int(off_s)
        except FileNotFoundError:
            return 0, 0
        except ValueError:
            log.warning("spool %s: unreadable cursor, reading from the start", self.directory)
            return 0, 0

    def _write_cursor(self, head: tuple[int, int]) -> None:
        tmp = self.directory / "cursor.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{head[0]} {head[1]}\n")
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, self.directory / "cursor")
        if self.fsync:
            _fsync_dir(self.directory)

    # --- writing --------------------------------------------------------------------------------
    def append(self, records: Sequence[Record]) -> int:
        """Append the longest prefix of ``records`` that fits; return how many were written.

        The records fill the write segment up to ``segment_bytes`` and go on in fresh ones, so a
        segment never holds more than that plus one record (the spent head's share of the
        bound). A write that fails keeps what earlier segments took (written and synced)."""
        with self._lock:
            self._check_open()
            room = self.max_bytes - self.used_bytes
            chunks: list[tuple[bytearray, int]] = []  # one per segment: (bytes, records)
            buf, count, total = bytearray(), 0, 0
            fill = self._ends[self._write_seg]
            for key, value in records:
                if len(key) > MAX_KEY_BYTES:
                    raise ValueError(f"spool key is {len(key)} bytes, at most {MAX_KEY_BYTES}")
                size = _HEADER.size + len(key) + len(value)
                if total + size > room:
                    break
                buf += _HEADER.pack(len(value), len(key), zlib.crc32(value, zlib.crc32(key)))
                buf += key
                buf += value
                count, total, fill = count + 1, total + size, fill + size
                if fill >= self.segment_bytes:
                    chunks.append((buf, count))
                    buf, count, fill = bytearray(), 0, 0
            if count:
                chunks.append((buf, count))
            accepted = 0
            for chunk, n in chunks:
                if not self._write(chunk):
                    break
                self._pending_events += n
                self._pending_bytes += len(chunk)
                accepted += n
                if self._ends[self._write_seg] >= self.segment_bytes:
                    try:
                        self._roll()
                    except OSError:
                        log.exception("spool %s: cannot start a segment", self.directory)
                        self.write_failed = True
                        break
            return accepted

    def _write(self, buf: bytearray) -> bool:
        """Write ``buf`` at the write segment's end and sync it; False (logged) if that failed."""
        end = self._ends[self._write_seg]
        try:
            # Unbuffered, at the segment's known end: a write that fails (a full disk) leaves no
            # bytes in a buffer to be written ahead of the next append, and whatever part of it
            # reached the file lies past ``end``, where the next append writes over it and no
            # read goes.
            view = memoryview(buf)
            while view:
                written = os.pwrite(self._writer, view, end + len(buf) - len(view))
                view = view[written:]
            if self.fsync:
                os.fsync(self._writer)
        except OSError:
            log.exception("spool %s: append failed", self.directory)
            self.write_failed = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._writer, end)
            return False
        self._ends[self._write_seg] = end + len(buf)
        self.write_failed = False
        return True

    def _open_segment(self, seg: int) -> int:
        """A raw descriptor to write ``seg`` at explicit offsets (no O_APPEND: on Linux it
        makes ``pwrite`` ignore the offset)."""
        return os.open(self.directory / _segment_name(seg), os.O_WRONLY | os.O_CREAT, 0o644)

    def _roll(self) -> None:
        writer = self._open_segment(self._write_seg + 1)  # first: a failure changes nothing
        os.close(self._writer)
        self._write_seg += 1
        self._ends[self._write_seg] = 0
        self._writer = writer
        if self.fsync:
            _fsync_dir(self.directory)

    # --- reading --------------------------------------------------------------------------------
    def read(self, max_records: int = 1000, max_bytes: int = 4 * 1024 * 1024) -> SpoolBatch:
        """The oldest records (at most ``max_records``, about ``max_bytes``), not removed."""
        with self._lock:
            self._check_open()
            seg, off = self._head
            start = (seg, off)
            records: list[Record] = []
            nbytes = 0
            while len(records) < max_records and nbytes < max_bytes:
                end = self._ends.get(seg)
                if end is None:
                    break
                if off >= end:
                    later = [s for s in self._ends if s > seg]
                    if not later:
                        break
                    seg, off = min(later), 0
                    continue
                chunk = os.pread(self._reader(seg), min(end - off, max(max_bytes - nbytes, 1)), off)
                pos = 0
                while len(records) < max_records and pos + _HEADER.size <= len(chunk):
                    vlen, klen, crc = _HEADER.unpack_from(chunk, pos)
                    body_end = pos + _HEADER.size + klen + vlen
                    if body_end > len(chunk):
                        if pos == 0:  # one record larger than the chunk: read it whole
                            chunk = os.pread(self._reader(seg), body_end, off)
                            continue
                        break
                    key = bytes(chunk[pos + _HEADER.size : pos + _HEADER.size + klen])
                    value = bytes(chunk[pos + _HEADER.size + klen : body_end])
                    if zlib.crc32(value, zlib.crc32(key)) != crc:
                        raise OSError(f"spool {self.directory}: corrupt record in segment {seg}")
                    records.append((key, value))
                    pos = body_end
                if pos == 0:
                    break
                off += pos
                nbytes += pos
            return SpoolBatch(records, start, (seg, off), nbytes)

    def _reader(self, seg: int) -> int:
        fd = self._readers.get(seg)
        if fd is None:
            fd = os.open(self.directory / _segment_name(seg), os.O_RDONLY)
            self._readers[seg] = fd
        return fd

    def commit(self, batch: SpoolBatch) -> None:
        """Remove ``batch`` (which must be the current head) after it was delivered."""
        if not batch.records:
            return
        with self._lock:
            self._check_open()
            if batch.start != self._head:
                raise ValueError("spool batch is not at the head (committed twice?)")
            self._head = batch.end
            self._pending_events -= len(batch.records)
            self._pending_bytes -= batch.nbytes
            self._release_spent()

    def _release_spent(self) -> None:
        """Store the head and delete the segments before it; an empty spool, or a head at the
        end of a segment, moves on to the next segment first, so the spent one goes now (its
        bytes count against ``max_bytes`` until then). Caller holds ``_lock``."""
        seg, off = self._head
        if self._pending_events == 0 and off > 0:
            if seg == self._write_seg:
                self._roll()
            self._head = (self._write_seg, 0)
        elif seg < self._write_seg and off >= self._ends[seg]:
            self._head = (min(s for s in self._ends if s > seg), 0)
        self._write_cursor(self._head)
        for spent in [s for s in self._ends if s < self._head[0]]:
            del self._ends[spent]
            fd = self._readers.pop(spent, None)
            if fd is not None:
                os.close(fd)
            (self.directory / _segment_name(spent)).unlink(missing_ok=True)

    # --- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"spool {self.directory} is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.fsync:
                os.fsync(self._writer)
            os.close(self._writer)
            for fd in self._readers.values():
                os.close(fd)
            self._readers.clear()
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DEFAULT_SEGMENT_BYTES", "Record", "Spool", "SpoolBatch", "SpoolCut", "SpoolLocked"]
