"""`polystream backfill` as users run it: a local REST API, a real PostgreSQL, files."""

from __future__ import annotations

import datetime as dt
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psycopg
import pytest

from polystream.analyze import analyze, read_bars
from polystream.display import BackfillProgress
from polystream.rest import RestClient, Wait
from test_cli import assert_one_sentence_error, env, records, run
from test_rest import KEY, MINUTE, T0, FakeMassive, Reply, api  # noqa: F401  (the fixture is used by name)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def moment(ms: int) -> str:
    """How the sentences show a minute: `2023-11-14 22:23`."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


def backfill(tmp_path: Path, api: FakeMassive, *args: str, **extra: str):  # type: ignore[no-untyped-def]  # noqa: F811
    return run(
        tmp_path,
        "backfill",
        *args,
        "--per-minute",
        "0",
        POLYGON_API_KEY=KEY,
        POLYGON_REST_URL=api.url,
        **extra,
    )


def stored(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_backfill_stores_every_page_once_and_a_second_run_nothing(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    database_url: str,
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    api.add_bars("X:BTCUSD", 10)
    api.add_trades("X:BTCUSD", 7)
    window = ("--from", iso(T0), "--to", iso(T0 + 10 * MINUTE))
    first = backfill(tmp_path, api, "X:BTCUSD", *window, "--trades", DATABASE_URL=database_url)
    assert first.returncode == 0, first.stderr
    assert stored(database_url, "bars") == 10 and stored(database_url, "trades") == 7
    assert "17 new rows stored" in first.stderr
    requests = len(api.seen)
    again = backfill(tmp_path, api, "X:BTCUSD", *window, "--trades", DATABASE_URL=database_url)
    assert again.returncode == 0, again.stderr
    assert "0 new rows stored" in again.stderr
    assert stored(database_url, "bars") == 10 and stored(database_url, "trades") == 7
    assert len(api.seen) == 2 * requests  # every page fetched once per run
    assert KEY not in first.stdout + first.stderr + again.stdout + again.stderr
    assert all(s.auth == f"Bearer {KEY}" and KEY not in s.path for s in api.seen)


def test_without_from_it_resumes_after_the_last_stored_bar(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    database_url: str,
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    api.add_bars("X:BTCUSD", 12)
    first = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 6 * MINUTE),
        DATABASE_URL=database_url,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    api.seen.clear()
    resumed = backfill(
        tmp_path, api, "X:BTCUSD", "--to", iso(T0 + 12 * MINUTE), DATABASE_URL=database_url
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "6 new rows stored" in resumed.stderr
    assert stored(database_url, "bars") == 12
    # the first request starts right after the last stored bar, and the run says so
    assert f"/{T0 + 6 * MINUTE}/" in api.seen[0].path
    said = f"X:BTCUSD 1m: resuming after {moment(T0 + 5 * MINUTE)} UTC (the last stored bar)"
    assert said in resumed.stderr
    api.seen.clear()
    again = backfill(
        tmp_path, api, "X:BTCUSD", "--to", iso(T0 + 12 * MINUTE), DATABASE_URL=database_url
    )
    assert again.returncode == 0, again.stderr
    assert f"up to date (the last stored bar is {moment(T0 + 11 * MINUTE)} UTC)" in again.stderr
    assert not api.seen
    nothing = backfill(tmp_path, api, "X:ETHUSD", DATABASE_URL=database_url)
    assert_one_sentence_error(nothing, "No 1m bars of X:ETHUSD are stored yet", "--from")
    assert not api.seen


def test_output_file_is_what_analyze_and_filter_test_read(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 40)
    out = tmp_path / "bars.csv"
    result = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 40 * MINUTE),
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 40 bars" in result.stderr
    analyzed = run(tmp_path, "analyze", str(out), "-o", str(tmp_path / "out.csv"))
    assert analyzed.returncode == 0, analyzed.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    header = "symbol,time,open,high,low,close,volume,rsi_14"
    assert len(lines) == 41 and lines[0].startswith(header)
    assert lines[1].startswith(f"X:BTCUSD,{T0},")
    (tmp_path / "up.yaml").write_text("name: up\nwhen: close > open\ntrigger: level\n")
    tested = run(tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(out))
    assert tested.returncode == 0, tested.stderr


def test_mistakes_are_one_sentence_before_any_request(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 3)
    out = str(tmp_path / "b.csv")
    wrong_order = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0 + MINUTE), "--to", iso(T0), "--output", out
    )
    assert_one_sentence_error(wrong_order)
    assert not api.seen
    nowhere = backfill(tmp_path, api, "X:BTCUSD", "--from", iso(T0))
    assert_one_sentence_error(nowhere, "DATABASE_URL", "--output")
    bad_date = backfill(tmp_path, api, "X:BTCUSD", "--from", "yesterday", "--output", out)
    assert bad_date.returncode == 2 and "--from" in bad_date.stderr  # bad usage
    no_key = run(tmp_path, "backfill", "X:BTCUSD", "--from", iso(T0), "--output", out)
    assert_one_sentence_error(no_key, "POLYGON_API_KEY")
    assert not api.seen
    api.not_entitled.add("X:BTCUSD")
    refused = backfill(
        tmp_path, api, "X:BTCUSD", "--from", iso(T0), "--to", iso(T0 + 3 * MINUTE), "--output", out
    )
    assert_one_sentence_error(refused)
    assert KEY not in refused.stderr


def zigzag(api: FakeMassive, ticker: str, count: int, base: float, start: int = T0) -> None:  # noqa: F811
    """`count` minute bars of `ticker` that rise and fall, so that oscillators swing."""
    rows = {}
    for i in range(count):
        p = base * (1 + 0.02 * ((i * 7) % 11 - 5) / 5 + 0.001 * i)
        rows[start + i * MINUTE] = {
            "o": p,
            "h": p * 1.01,
            "l": p * 0.98,
            "c": p * (1.005 if i % 3 else 0.985),
            "v": 1.0 + i % 5,
            "vw": p,
            "n": 3,
            "t": start + i * MINUTE,
        }
    api.bars[ticker] = rows


def two_symbol_file(tmp_path: Path, api: FakeMassive, name: str) -> Path:  # noqa: F811
    zigzag(api, "X:BTCUSD", 60, 30_000.0)
    zigzag(api, "X:ETHUSD", 50, 2_000.0, start=T0 + 10 * MINUTE)
    out = tmp_path / name
    result = backfill(
        tmp_path, api, "X:BTCUSD", "ETH-USD", "--from", iso(T0), "--to", iso(T0 + 60 * MINUTE),
        "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 110 bars" in result.stderr
    return out


@pytest.mark.parametrize("name", ["bars.csv", "bars.parquet"])
def test_output_file_has_a_symbol_column_sorted_by_symbol_then_time(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    name: str,
) -> None:
    out = two_symbol_file(tmp_path, api, name)
    frame = pl.read_csv(out) if name.endswith(".csv") else pl.read_parquet(out)
    assert frame.columns == ["symbol", "time", "open", "high", "low", "close", "volume"]
    assert frame["symbol"].to_list() == ["X:BTCUSD"] * 60 + ["X:ETHUSD"] * 50
    assert frame["time"].to_list() == [T0 + i * MINUTE for i in range(60)] + [
        T0 + (10 + i) * MINUTE for i in range(50)
    ]
    assert frame.row(60)[2:] == pytest.approx(
        [api.bars["X:ETHUSD"][T0 + 10 * MINUTE][k] for k in "ohlcv"]
    )


def test_a_two_symbol_file_is_what_analyze_and_filter_test_read(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    out = two_symbol_file(tmp_path, api, "bars.csv")
    # each symbol's rows alone, as a file of one symbol without a symbol column
    alone = {}
    for symbol in ("X:BTCUSD", "X:ETHUSD"):
        alone[symbol] = tmp_path / f"{symbol[2:]}.csv"
        read_bars(out, symbol).drop("symbol").write_csv(alone[symbol])

    analyzed = run(tmp_path, "analyze", str(out), "-o", str(tmp_path / "out.parquet"))
    assert analyzed.returncode == 0, analyzed.stderr
    result = pl.read_parquet(tmp_path / "out.parquet")
    assert result.columns[:2] == ["symbol", "time"]
    for symbol, path in alone.items():
        assert result.filter(pl.col("symbol") == symbol).drop("symbol").equals(analyze(path))

    (tmp_path / "up.yaml").write_text("name: up\nwhen: close > open\ntrigger: edge\n")
    tested = run(
        tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(out), "--json"
    )
    assert tested.returncode == 0, tested.stderr
    fired = [a["symbol"] for a in records(tested.stdout)]
    for symbol, path in alone.items():
        single = run(
            tmp_path, "filter", "test", str(tmp_path / "up.yaml"), "--bars", str(path),
            "--symbol", symbol, "--json",
        )  # fmt: skip
        assert single.returncode == 0, single.stderr
        assert fired.count(symbol) == len(records(single.stdout)) > 0, symbol


# --- waiting, Ctrl-C, --json --------------------------------------------------------------------


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "polystream", "backfill", *args]


def started(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    args: list[str],
    **extra: str,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args),
        cwd=tmp_path,
        env=env(tmp_path, POLYGON_API_KEY=KEY, POLYGON_REST_URL=api.url, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_requests(api: FakeMassive, count: int, proc: subprocess.Popen[str]) -> None:  # noqa: F811
    deadline = time.monotonic() + 20
    while len(api.seen) < count:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)  # the served pages have reached the command


class Terminal:
    """A backfill whose stdout and stderr are a terminal, as a trader runs it."""

    def __init__(self, tmp_path: Path, api: FakeMassive, args: list[str]) -> None:  # noqa: F811
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            command(*args),
            cwd=tmp_path,
            env=env(tmp_path, POLYGON_API_KEY=KEY, POLYGON_REST_URL=api.url),
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.fd = master
        self.raw = b""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def read_until(self, done: str | None, timeout: float = 30) -> None:
        """Read what is shown until `done` appears (None: until the command ends)."""
        deadline = time.monotonic() + timeout
        while (done is None or done not in self.text) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the command ended and closed the terminal
                break
            if not data:
                break
            self.raw += data
        assert done is None or done in self.text, self.text

    def end(self) -> int:
        self.read_until(None)
        os.close(self.fd)
        return self.proc.wait(10)


def test_a_wait_shows_on_the_progress_line_until_requests_go_on(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    # Before: the bar stood still through a 429 or a 5xx backoff without a word.
    api.add_bars("X:BTCUSD", 9)
    api.faults[1] = Reply(429, {"status": "ERROR", "error": "too many"}, {"Retry-After": "2"})
    api.faults[2] = Reply(503)
    out = tmp_path / "bars.csv"
    window = ["--from", iso(T0), "--to", iso(T0 + 9 * MINUTE)]
    term = Terminal(tmp_path, api, ["X:BTCUSD", *window, "-o", str(out), "--per-minute", "0"])
    assert term.end() == 0, term.text
    text = term.text
    assert re.search(r"X:BTCUSD .*33%.* waiting [12]s \(429 from the server\)", text), text
    # the 429 counted as the first attempt: the backoff has doubled to 2 s
    assert re.search(r"waiting [12]s \(server error 503, retry 2\)", text), text
    assert "100%" in text.rsplit("waiting", 1)[1]  # back to a plain progress line
    assert "wrote 9 bars" in text


def test_the_rate_limit_wait_shows_and_ctrl_c_in_a_terminal_keeps_the_rows(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 6)
    out = tmp_path / "bars.csv"
    window = ["--from", iso(T0), "--to", iso(T0 + 6 * MINUTE)]
    term = Terminal(tmp_path, api, ["X:BTCUSD", *window, "-o", str(out), "--per-minute", "1"])
    term.read_until("(rate limit 1/min)")
    assert re.search(r"X:BTCUSD .*50%.* waiting (59|60)s \(rate limit 1/min\)", term.text)
    term.proc.send_signal(signal.SIGINT)
    assert term.end() == 130, term.text
    assert len(api.seen) == 1  # the second request was never sent
    assert "interrupted: wrote 3 bars" in term.text and "Traceback" not in term.text
    assert pl.read_csv(out)["time"].to_list() == [T0, T0 + MINUTE, T0 + 2 * MINUTE]


def test_the_client_tells_each_wait_and_its_end(api: FakeMassive) -> None:  # noqa: F811
    api.add_bars("X:BTCUSD", 9)
    api.faults[1] = Reply(429, {}, {"Retry-After": "0.2"})
    api.faults[2] = Reply(502)
    told: list[tuple[str, Wait | None]] = []
    client = RestClient(
        api.url, KEY, per_minute=2, window=0.5, backoff_initial=0.1,
        on_wait=lambda symbol, wait: told.append((symbol, wait)),
    )  # fmt: skip
    pages = list(client.aggregates("X:BTCUSD", MINUTE, T0, T0 + 9 * MINUTE))
    assert [p.height for p in pages] == [3, 3, 3]
    waits = [w for _, w in told]
    assert {s for s, _ in told} == {"X:BTCUSD"}
    assert waits[1::2] == [None] * (len(waits) // 2)  # every wait is followed by its end
    reasons = [w.reason for w in waits[::2] if w is not None]
    assert reasons[:3] == [
        "429 from the server",
        "rate limit 2 per 0.5s",
        "server error 502, retry 2",
    ]
    assert waits[0] == Wait(0.2, "429 from the server")
    assert (client.requests_sent, client.pages_received) == (5, 3)
    paused = sum(w.seconds for w in waits if w is not None)
    assert client.waited == pytest.approx(paused, abs=0.1)


def test_plain_output_tells_only_of_waits_longer_than_5_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with BackfillProgress({"X:BTCUSD": T0}, T0 + MINUTE, plain=True) as progress:
        progress("X:BTCUSD", 3, T0 + 30_000)
        progress.waiting("X:BTCUSD", Wait(3.0, "429 from the server"))
        progress.waiting("X:BTCUSD", None)
        progress.waiting("X:BTCUSD", Wait(10.2, "rate limit 5/min"))
        progress.waiting("X:BTCUSD", None)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "X:BTCUSD: waiting 11s (rate limit 5/min)\n"


def test_json_is_a_summary_line_per_symbol_and_stderr_stays_plain(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    api.add_bars("X:BTCUSD", 7)
    api.add_bars("X:ETHUSD", 2)
    api.faults[1] = Reply(503)  # one backoff of 1 s: too short for a line
    out = tmp_path / "bars.parquet"
    end = T0 + 7 * MINUTE
    result = backfill(
        tmp_path, api, "X:BTCUSD", "eth-usd", "--from", iso(T0), "--to", iso(end),
        "-o", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = records(result.stdout)
    waited = [line.pop("waited_s") for line in lines]
    common = {"timeframe": "1m", "from": T0, "to": end, "trades": None, "interrupted": False}
    assert lines == [
        {"symbol": "X:BTCUSD", **common, "bars": 7, "pages": 3, "requests": 4, "output": str(out)},
        {"symbol": "X:ETHUSD", **common, "bars": 2, "pages": 1, "requests": 1, "output": str(out)},
    ]
    assert list(records(result.stdout)[0]) == [
        "symbol", "timeframe", "from", "to", "bars", "trades", "pages", "requests",
        "waited_s", "interrupted", "output",
    ]  # fmt: skip
    assert 0.9 <= waited[0] < 5 and waited[1] == 0
    assert result.stderr.strip() == f"wrote 9 bars to {out}"
    assert pl.read_parquet(out).height == 9


def test_ctrl_c_writes_the_fetched_bars_and_says_how_to_go_on(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
) -> None:
    # Before: Ctrl-C lost every bar fetched so far.
    api.add_bars("X:BTCUSD", 30)
    api.hold_from = 3  # three pages, then the server is slow
    out = tmp_path / "bars.csv"
    end = T0 + 30 * MINUTE
    proc = started(
        tmp_path, api, ["X:BTCUSD", "--from", iso(T0), "--to", iso(end), "-o", str(out), "--json"]
    )
    wait_for_requests(api, 4, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 130, stderr
    reached = T0 + 9 * MINUTE
    go_on = iso(reached)[:-3]  # 2023-11-14T22:23
    assert stderr.strip() == (
        f"interrupted: wrote 9 bars (X:BTCUSD up to {moment(reached)} UTC) to {out}; "
        f"run again with --from {go_on} into a new file to continue"
    )
    assert "Traceback" not in stderr
    bars = pl.read_csv(out)
    assert bars.columns == ["symbol", "time", "open", "high", "low", "close", "volume"]
    assert bars["time"].to_list() == [T0 + i * MINUTE for i in range(9)]
    [line] = records(stdout)
    assert (line["bars"], line["from"], line["to"], line["interrupted"]) == (9, T0, reached, True)

    # going on as told fetches exactly the rest
    api.hold_from = None
    rest = tmp_path / "rest.csv"
    again = backfill(tmp_path, api, "X:BTCUSD", "--from", go_on, "--to", iso(end), "-o", str(rest))
    assert again.returncode == 0, again.stderr
    both = pl.concat([bars, pl.read_csv(rest)])
    assert both["time"].to_list() == [T0 + i * MINUTE for i in range(30)]


def test_ctrl_c_keeps_the_stored_rows_and_a_run_without_from_goes_on(
    tmp_path: Path,
    api: FakeMassive,  # noqa: F811
    database_url: str,
) -> None:
    assert run(tmp_path, "migrate", DATABASE_URL=database_url).returncode == 0
    api.add_bars("X:BTCUSD", 30)
    api.add_bars("X:ETHUSD", 30)
    api.hold_from = 3
    end = T0 + 30 * MINUTE
    proc = started(
        tmp_path, api, ["X:BTCUSD", "X:ETHUSD", "--from", iso(T0), "--to", iso(end)],
        DATABASE_URL=database_url,
    )  # fmt: skip
    wait_for_requests(api, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    reached = T0 + 9 * MINUTE
    assert stderr.strip() == (
        "interrupted: fetched 9 rows; 9 new rows stored "
        f"(X:BTCUSD up to {moment(reached)} UTC, X:ETHUSD not started); "
        f"run again for X:BTCUSD with --from {iso(reached)[:-3]} "
        f"and for X:ETHUSD with --from {iso(T0)[:-3]} to continue"
    )
    assert stored(database_url, "bars") == 9

    api.hold_from = None
    api.seen.clear()
    resumed = backfill(
        tmp_path, api, "X:BTCUSD", "--to", iso(end), "--json", DATABASE_URL=database_url
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {moment(reached - MINUTE)} UTC (the last stored bar)" in resumed.stderr
    [line] = records(resumed.stdout)
    assert (line["from"], line["to"], line["bars"], line["output"]) == (reached, end, 21, None)
    assert stored(database_url, "bars") == 30
