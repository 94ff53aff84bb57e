import gzip
import logging
import time
from pathlib import Path

import pytest

from polystream.errors import RecordingError
from polystream.events import MAX_TIME
from polystream.record import Recorder, ReplaySource, read_recording
from polystream.source import EndOfStream, Frame, Frames, Item, Notice


def frames(n: int, start: int = 1_700_000_000_000, step: int = 10) -> list[Frame]:
    return [
        Frame(
            start + i * step,
            b'[{"ev":"XT","pair":"BTC-USD","p":%d,"s":1,"t":%d}]' % (100 + i, start + i * step),
        )
        for i in range(n)
    ]


def drain(source: ReplaySource, timeout: float = 10, max_bytes: int = 10_000) -> list[Item]:
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items += source.take(0.2, max_bytes, 0.05)
        if items and isinstance(items[-1], EndOfStream):
            return items
    raise AssertionError("replay did not end")


@pytest.mark.parametrize("suffix", [".rec", ".rec.gz", ".rec.zst"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"feed{suffix}"
    rec = Recorder(path)
    original = frames(500)
    for f in original:
        rec.write(f)
    rec.close()
    assert list(read_recording(path)) == original
    source = ReplaySource(path).start()
    items = drain(source)
    assert isinstance(items[0], Notice)
    replayed = [f for i in items if isinstance(i, Frames) for f in i.frames]
    assert replayed == original  # handed over in chunks when not paced
    assert 1 < sum(isinstance(i, Frames) for i in items) < len(original)
    assert items[-1] == EndOfStream(None)
    assert source.join(2)


def test_file_format_is_time_tab_frame(tmp_path: Path) -> None:
    path = tmp_path / "plain.rec"
    rec = Recorder(path)
    rec.write(Frame(1, b'[{"ev":"status",\n"status":"connected"}]'))
    rec.close()
    assert path.read_bytes() == b'1\t[{"ev":"status", "status":"connected"}]\n'


def test_gzip_is_real_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.rec.gz"
    rec = Recorder(path)
    rec.write(Frame(5, b"[]"))
    rec.close()
    assert gzip.decompress(path.read_bytes()) == b"5\t[]\n"


def test_speed_paces_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "paced.rec"
    rec = Recorder(path)
    for f in frames(11, step=100):  # one second of feed
        rec.write(f)
    rec.close()
    started = time.monotonic()
    drain(ReplaySource(path, speed=4).start())
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.0


def test_damaged_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "damaged.rec"
    path.write_bytes(b"1\t[]\ngarbage line\n2\t[1]\n\n3\t")
    assert list(read_recording(path)) == [Frame(1, b"[]"), Frame(2, b"[1]")]


def test_not_a_recording_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text("time,open,high,low,close\n1,2,3,4,5\n")
    source = ReplaySource(path).start()
    items = drain(source)
    end = items[-1]
    assert isinstance(end, EndOfStream) and end.error is not None
    assert "is not a polystream recording" in end.error
    assert isinstance(source.fatal, RecordingError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="does not exist"):
        ReplaySource(tmp_path / "nope.rec")


@pytest.mark.parametrize(
    "stamp", [b"99999999999999999999999", b"9" * 5_000, b"%d" % (MAX_TIME + 1)], ids=len
)
def test_a_stamp_out_of_range_is_a_damaged_line(
    tmp_path: Path, stamp: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # even on line 1: the line has a recording's form, so the file is a recording
    path = tmp_path / "stamps.rec"
    path.write_bytes(b"%s\t[]\n1\t[]\n%s\t[2]\n%d\t[3]\n" % (stamp, stamp, MAX_TIME))
    with caplog.at_level(logging.WARNING):
        assert list(read_recording(path)) == [Frame(1, b"[]"), Frame(MAX_TIME, b"[3]")]
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert [m.split(" line ")[1] for m in damaged] == [
        "1 is damaged and was skipped",
        "3 is damaged and was skipped",
    ]


@pytest.mark.parametrize("suffix", [".bz2", ".xz", ".zip"])
def test_a_compression_recordings_do_not_use_is_refused(tmp_path: Path, suffix: str) -> None:
    # Before: `--record out.rec.bz2` wrote plain text under that name.
    path = tmp_path / f"out.rec{suffix}"
    with pytest.raises(RecordingError, match=rf"names \{suffix} compression.*\.gz or \.zst"):
        Recorder(path)
    assert not path.exists()
