"""The event log's file: whole lines, rotated by size even when one write brings many."""

from pathlib import Path

from app.log import AppendFile, rotated


def test_a_large_write_of_many_lines_rotates_between_them(tmp_path: Path) -> None:
    """One write of 400 KiB of lines (a loop turn of many batches) with a 64 KiB limit: the
    lines land whole and in order over several files, none far past the limit."""
    log = tmp_path / "event.log"
    out = AppendFile(log, max_bytes=65536, keep=100)
    lines = [b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * 300) for n in range(1300)]
    out.write(b"".join(lines))
    out.write(b'{"n":"last"}\n')
    files = rotated(log)
    assert len(files) >= 5
    assert all(path.stat().st_size <= 65536 + 2 * 4096 for path in files)  # 2 checks past
    assert b"".join(path.read_bytes() for path in files) == b"".join(lines) + b'{"n":"last"}\n'


def test_a_line_longer_than_a_check_is_written_whole(tmp_path: Path) -> None:
    """A line longer than the rotation check's size still goes in one write, unsplit."""
    log = tmp_path / "event.log"
    out = AppendFile(log, max_bytes=1024, keep=10)
    long = b'{"pad":"%s"}\n' % (b"y" * 5000)
    out.write(b'{"a":1}\n' + long + b'{"b":2}\n')
    data = b"".join(path.read_bytes() for path in rotated(log))
    assert data == b'{"a":1}\n' + long + b'{"b":2}\n'
