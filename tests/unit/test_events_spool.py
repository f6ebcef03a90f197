"""The emitter's on-disk spool: FIFO, durable across reopen, bounded on disk, recovers a torn
tail and tells what it cut."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.spool import Spool, SpoolCut, SpoolLocked


def recs(n: int, start: int = 0, size: int = 20) -> list[tuple[bytes, bytes]]:
    return [
        (f"t{i % 3}".encode(), f"{i:08d}".encode().ljust(size, b"."))
        for i in range(start, start + n)
    ]


def disk_bytes(directory: Path | str) -> int:
    """What the spool's segment files take on disk, measured, not as the spool counts it."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.seg"))


def drain(spool: Spool) -> list[tuple[bytes, bytes]]:
    out = []
    while batch := spool.read(max_records=7):
        out += batch.records
        spool.commit(batch)
    return out


def test_records_come_out_in_the_order_they_went_in_across_segments(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200) as spool:
        for start in range(0, 50, 5):
            spool.append(recs(5, start=start))
        assert len(list(tmp_path.glob("*.seg"))) > 3
        assert drain(spool) == recs(50)
        assert spool.pending_events == 0 and spool.pending_bytes == 0
        assert len(list(tmp_path.glob("*.seg"))) == 1  # spent segments deleted


def test_read_does_not_remove_and_only_commit_does(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(5))
        first = spool.read(max_records=3)
        assert spool.read(max_records=3).records == first.records == recs(3)
        spool.commit(first)
        assert spool.read().records == recs(2, start=3)
        assert spool.pending_events == 2


def test_a_batch_can_be_committed_only_once(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(4))
        batch = spool.read(max_records=2)
        spool.commit(batch)
        with pytest.raises(ValueError, match="not at the head"):
            spool.commit(batch)


def test_uncommitted_records_survive_a_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300) as spool:
        spool.append(recs(40))
        spool.commit(spool.read(max_records=15))
    with Spool(tmp_path, max_bytes=1 << 20, segment_bytes=300) as spool:
        assert spool.pending_events == 25
        spool.append(recs(5, start=40))
        assert drain(spool) == recs(30, start=15)


def test_append_accepts_the_prefix_that_fits_and_never_exceeds_the_bound(tmp_path: Path) -> None:
    one = 10 + 2 + 20  # header + key + value
    with Spool(tmp_path, max_bytes=one * 10) as spool:
        assert spool.append(recs(7)) == 7
        assert spool.append(recs(7, start=7)) == 3
        assert spool.append(recs(1, start=14)) == 0
        assert spool.pending_bytes == one * 10
        spool.commit(spool.read(max_records=4))
        assert spool.append(recs(5, start=10)) == 4
        assert [v for _, v in drain(spool)] == [v for _, v in recs(6, 4) + recs(4, 10)]


def test_a_torn_record_at_the_tail_is_cut_on_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(3))
    seg = next(tmp_path.glob("*.seg"))
    with open(seg, "ab") as fh:
        fh.write(b"\x00\x00\x00\x50\x00\x02half-a-record")
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert spool.pending_events == 3
        spool.append(recs(1, start=3))
        assert drain(spool) == recs(4)


def test_a_corrupted_record_and_what_follows_it_are_cut_on_reopen(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(3))
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of the last record's value
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert drain(spool) == recs(2)


def test_a_cut_in_the_middle_of_a_segment_tells_how_many_records_it_took(tmp_path: Path) -> None:
    """A damaged record takes every record after it in its segment; the spool says how many
    (the damaged one and the intact ones after it), for the emitter to count as dropped."""
    one = 10 + 2 + 20
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(10))
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[3 * one + 15] ^= 0xFF  # a byte of the 4th record's value
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert spool.cuts == [SpoolCut(0, 3 * one, 7 * one, records=7)]
        assert drain(spool) == recs(3)


def test_a_cut_whose_record_count_cannot_be_told_says_so(tmp_path: Path) -> None:
    """A damaged length field (or a torn tail) leaves the records after it unknowable."""
    one = 10 + 2 + 20
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        spool.append(recs(10))
    seg = next(tmp_path.glob("*.seg"))
    data = bytearray(seg.read_bytes())
    data[5 * one] ^= 0x7F  # the high byte of the 6th record's value length
    seg.write_bytes(bytes(data))
    with Spool(tmp_path, max_bytes=1 << 20) as spool:
        assert spool.cuts == [SpoolCut(0, 5 * one, 5 * one, records=None)]
        assert drain(spool) == recs(5)


def test_spent_records_never_take_the_disk_past_the_bound(tmp_path: Path) -> None:
    """A backlog the replayer never quite catches up with (one record replayed, one more
    spooled, over and over): the spent records of the head segment used to stay on disk until
    it reached its 16 MiB, with a bound of 64 KiB. They count against the bound now, and the
    spool still takes every record, since it only ever holds ten."""
    bound = 64 * 1024
    rec = (b"tenant", b"x" * 400)
    with Spool(tmp_path, max_bytes=bound, fsync=False) as spool:
        assert spool.append([rec] * 10) == 10
        most = 0
        for _ in range(2000):
            assert spool.append([rec]) == 1
            spool.commit(spool.read(max_records=1))
            most = max(most, disk_bytes(tmp_path))
        assert spool.pending_events == 10
    assert most <= bound


def test_a_spool_directory_has_one_owner_at_a_time(tmp_path: Path) -> None:
    with Spool(tmp_path, max_bytes=1024), pytest.raises(SpoolLocked, match="in use"):
        Spool(tmp_path, max_bytes=1024)
    Spool(tmp_path, max_bytes=1024).close()  # released on close


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 12)),
        st.tuples(st.just("read_commit"), st.integers(1, 9)),
        st.tuples(st.just("read_only"), st.integers(1, 9)),
        st.tuples(st.just("reopen"), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_the_spool_behaves_like_a_bounded_fifo_through_any_sequence_of_operations(
    steps: list[tuple[str, int]],
) -> None:
    bound = 400
    with tempfile.TemporaryDirectory() as d:
        model: collections.deque[tuple[bytes, bytes]] = collections.deque()
        model_bytes = 0
        spool = Spool(d, max_bytes=bound, segment_bytes=150)
        counter = 0
        try:
            for op, n in steps:
                if op == "append":
                    batch = recs(n, start=counter, size=5 + counter % 17)
                    counter += n
                    used = disk_bytes(d)  # spent records still on disk count too
                    accepted = spool.append(batch)
                    fits = 0
                    for key, value in batch:
                        size = 10 + len(key) + len(value)
                        if used + size > bound:
                            break
                        model.append((key, value))
                        model_bytes += size
                        used += size
                        fits += 1
                    assert accepted == fits
                elif op in ("read_commit", "read_only"):
                    got = spool.read(max_records=n)
                    assert got.records == list(model)[:n]
                    if op == "read_commit":
                        spool.commit(got)
                        for key, value in got.records:
                            model.popleft()
                            model_bytes -= 10 + len(key) + len(value)
                else:
                    spool.close()
                    spool = Spool(d, max_bytes=bound, segment_bytes=150)
                assert spool.pending_events == len(model)
                assert spool.pending_bytes == model_bytes
                assert spool.used_bytes == disk_bytes(d) <= bound
        finally:
            spool.close()


_DISK_FULL_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from metering.spool import Spool

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
root = Path(sys.argv[1])
rec = lambda tag, i: (b"k", f"{tag}{i}".encode().ljust(400, b"."))
spool = Spool(root, max_bytes=1 << 20, fsync=False)
out = {"a": spool.append([rec("A", i) for i in range(3)])}
seg = next(root.glob("*.seg"))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (seg.stat().st_size + 600, hard))  # the disk fills
out["b"] = spool.append([rec("B", i) for i in range(2)])
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
out["c"] = spool.append([rec("C", i) for i in range(2)])
batch = spool.read(max_records=100)
out["read"] = [v[:2].decode() for _, v in batch.records]
spool.commit(batch)
out["d"] = spool.append([rec("D", 0)])
spool.close()
again = Spool(root, max_bytes=1 << 20, fsync=False)
out["after_reopen"] = [v[:2].decode() for _, v in again.read(max_records=100).records]
again.close()
print(json.dumps(out))
"""


def test_an_append_the_full_disk_refused_leaves_nothing_behind(tmp_path: Path) -> None:
    """The disk fills during an append (RLIMIT_FSIZE stands in for it, in a child process):
    that batch is refused whole, and the next append, once there is space, is read back as
    written. A buffered writer used to keep the refused bytes and write them ahead of the next
    batch, so the reader got the refused batch and the accepted one was deleted unread."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _DISK_FULL_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert (out["a"], out["b"], out["c"]) == (3, 0, 2)
    assert out["read"] == ["A0", "A1", "A2", "C0", "C1"]
    assert out["after_reopen"] == ["D0"]
