import json
import logging

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polystream.batch import Batch, Batcher
from polystream.decode import Decoder
from polystream.errors import SymbolError
from polystream.events import (
    MAX_EXCHANGE,
    MAX_NOTIONAL,
    MAX_PRICE,
    MAX_SIZE,
    MAX_TIME,
    Aggregate,
    Book,
    FairValue,
    Quote,
    SecondAggregate,
    Status,
    Trade,
)
from polystream.schema import SIDE_BUY, SIDE_SELL
from polystream.source import Frame
from polystream.symbols import from_pair
from polystream.window import BarEngine, BarOptions

TRADE = (
    b'{"ev":"XT","pair":"BTC-USD","p":33021.9,"t":1610462007425,"s":0.01616617,'
    b'"c":[2],"i":"14272084","x":3,"r":1610462007576}'
)
QUOTE = (
    b'{"ev":"XQ","pair":"BTC-USD","bp":33052.79,"bs":0.48,"ap":33073.19,"as":0.601,'
    b'"t":1610462411115,"x":1,"r":1610462411128}'
)
AGG = (
    b'{"ev":"XA","pair":"BCD-USD","v":951.6112,"vw":0.7756,"z":73,"o":0.772,"c":0.784,'
    b'"h":0.784,"l":0.771,"s":1610463240000,"e":1610463300000}'
)
BOOK = (
    b'{"ev":"XL2","pair":"BTC-USD","t":1610462411115,"r":1610462411128,"x":1,'
    b'"b":[[33712.71,0.18635],[33712.7,0.134]],"a":[[33718.23,3.5527483],[33718.24,0.1]]}'
)


def frame(*parts: bytes) -> bytes:
    return b"[" + b",".join(parts) + b"]"


def test_every_event_type_decodes() -> None:
    d = Decoder()
    events = d.decode(
        frame(
            TRADE,
            QUOTE,
            AGG,
            AGG.replace(b'"XA"', b'"XAS"'),
            BOOK,
            b'{"ev":"FMV","fmv":33021.9,"sym":"X:BTC-USD","t":1610462007425}',
            b'{"ev":"status","status":"connected","message":"Connected Successfully"}',
        )
    )
    assert [type(e) for e in events] == [
        Trade,
        Quote,
        Aggregate,
        SecondAggregate,
        Book,
        FairValue,
        Status,
    ]
    t = events[0]
    assert isinstance(t, Trade)
    assert (t.pair, t.price, t.size, t.time, t.trade_id, t.exchange) == (
        "BTC-USD",
        33021.9,
        0.01616617,
        1610462007425,
        "14272084",
        3,
    )
    assert t.side == SIDE_BUY
    q = events[1]
    assert isinstance(q, Quote) and (q.bid, q.ask_size) == (33052.79, 0.601)
    a = events[2]
    assert isinstance(a, Aggregate) and a.volume == 951.6112 and a.end - a.start == 60_000
    b = events[4]
    assert isinstance(b, Book) and b.bids[0] == (33712.71, 0.18635)
    assert d.stats.events == 7 and d.stats.rejected_events == 0


def test_tolerances_the_real_feed_needs() -> None:
    d = Decoder()
    events = d.decode(
        frame(
            # integer id, sell side, unknown extra field, missing r
            b'{"ev":"XT","pair":"ETH-USD","p":1,"t":1,"s":2,"c":[1],"i":42,"x":1,"zz":true}',
            # no id, no conditions, no exchange
            b'{"ev":"XT","pair":"ETH-USD","p":1.5,"t":2,"s":0.5}',
            # fractional z, no vw
            b'{"ev":"XAS","pair":"ETH-USD","v":1.5,"z":0.25,"o":1,"c":1,"h":1,"l":1,"s":0,"e":1000}',
            # FMV with a nanosecond timestamp
            b'{"ev":"FMV","fmv":1.0,"sym":"X:ETH-USD","t":1610462007425000000}',
        )
    )
    t1, t2, agg, fmv = events
    assert isinstance(t1, Trade) and t1.trade_id == "42" and t1.side == SIDE_SELL
    assert isinstance(t2, Trade) and t2.trade_id is None and t2.conditions == []
    assert isinstance(agg, SecondAggregate) and agg.vwap is None and agg.avg_size == 0.25
    assert isinstance(fmv, FairValue) and fmv.time == 1610462007425


def test_a_bad_element_costs_only_that_element(caplog: object) -> None:
    d = Decoder()
    events = d.decode(
        frame(
            TRADE,
            b'{"ev":"XT","pair":"BTC-USD","p":"oops"}',
            QUOTE,
            b'{"ev":"AM","sym":"X:BTC-USD"}',
            b"17",
            TRADE,
        )
    )
    assert [type(e) for e in events] == [Trade, Quote, Trade]
    assert d.stats.rejected_events == 2
    assert d.stats.unknown_events == 1
    assert d.stats.malformed_frames == 0


def test_malformed_frames_are_counted_and_logged_a_few_times(caplog) -> None:  # type: ignore[no-untyped-def]
    d = Decoder()
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            assert d.decode(b'[{"ev":"XT",') == []
        assert d.decode(frame(TRADE)) != []
    assert d.stats.malformed_frames == 20
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) == 5


def test_a_lone_object_is_accepted() -> None:
    assert isinstance(Decoder().decode(TRADE)[0], Trade)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    d = Decoder()
    d.decode(data)
    assert d.stats.frames == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["ev", "pair", "p", "s", "t", "c", "i", "x", "bp", "ap", "bs", "as"]),
            json_values | st.sampled_from(["XT", "XQ", "XA", "status", "BTC-USD"]),
        ),
        max_size=6,
    )
)
def test_arbitrary_elements_never_raise(elements: list[dict[str, object]]) -> None:
    d = Decoder()
    events = d.decode(msgspec.json.encode(elements))
    s = d.stats
    assert len(events) + s.rejected_events + s.unknown_events == len(elements)


# -- ranges and pairs: a malformed element is rejected and counted, never raised -------------

AT = 1_700_000_000_000


def trade(**fields: object) -> dict[str, object]:
    return {"ev": "XT", "pair": "BTC-USD", "p": 100.0, "t": AT, "s": 1.0, "x": 1, **fields}


def quote(**fields: object) -> dict[str, object]:
    base = {"ev": "XQ", "pair": "BTC-USD", "bp": 1.0, "bs": 1.0, "ap": 2.0, "as": 1.0, "t": AT}
    return {**base, **{k.rstrip("_"): v for k, v in fields.items()}}


def build(*elements: dict[str, object], symbols: list[str] | None = None) -> tuple[Batch, Batcher]:
    batcher = Batcher(["X:BTCUSD"] if symbols is None else symbols)
    return batcher.build([Frame(AT, msgspec.json.encode(list(elements)))]), batcher


def test_numbers_at_their_limits_are_kept() -> None:
    batch, batcher = build(
        trade(t=0, x=0, p=0.0, s=0.0),
        trade(t=MAX_TIME, x=MAX_EXCHANGE, p=MAX_PRICE, s=MAX_NOTIONAL / MAX_PRICE),
        trade(p=MAX_NOTIONAL / MAX_SIZE, s=MAX_SIZE),
        quote(t=MAX_TIME, x=MAX_EXCHANGE, bp=MAX_PRICE, bs=MAX_SIZE, ap=0, as_=0),
    )
    assert (batch.trades.height, batch.quotes.height) == (3, 1)
    assert batch.trades["exchange"].to_list() == [0, MAX_EXCHANGE, 1]
    assert batcher.decoder.stats.rejected_events == 0
    book = {"ev": "XL2", "pair": "BTC-USD", "t": MAX_TIME, "x": MAX_EXCHANGE}
    agg = {"ev": "XA", "pair": "BTC-USD", "o": 0, "h": MAX_PRICE, "l": 0, "c": 1, "e": MAX_TIME}
    d = Decoder()
    events = d.decode(
        msgspec.json.encode(
            [
                {**book, "b": [[MAX_PRICE, MAX_SIZE]], "a": [[0, 0]]},
                {**agg, "v": MAX_SIZE, "vw": MAX_NOTIONAL / MAX_SIZE, "z": 1e3, "s": 0},
                {"ev": "FMV", "sym": "X:BTC-USD", "fmv": MAX_PRICE, "t": MAX_TIME * 1_000_000},
            ]
        )
    )
    assert [type(e) for e in events] == [Book, Aggregate, FairValue]
    assert d.stats.rejected_events == 0


@pytest.mark.parametrize(
    "element",
    [
        trade(x=MAX_EXCHANGE + 1),
        trade(x=-1),
        trade(t=MAX_TIME + 1),
        trade(t=2**64),
        trade(t=-1),
        trade(p=MAX_PRICE * 1.01),
        trade(p=-0.01),
        trade(s=MAX_SIZE * 1.01),
        trade(s=-1e-9),
        trade(p=MAX_PRICE, s=MAX_NOTIONAL / MAX_PRICE * 1.01),
        quote(bp=1e308),
        quote(bs=-1.0),
        quote(ap=MAX_PRICE * 2),
        quote(as_=1e300),
        quote(x=99_999),
        quote(t=10**30),
    ],
    ids=str,
)
def test_a_trade_or_quote_out_of_range_is_rejected_where_columns_are_built(
    element: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        batch, batcher = build(trade(), element, quote(), trade(i="last"))
    assert (batch.trades.height, batch.quotes.height) == (2, 1)
    assert batch.trades["trade_id"].to_list() == [None, "last"]
    stats = batcher.decoder.stats
    assert (stats.events, stats.rejected_events) == (3, 1)
    [record] = [r.getMessage() for r in caplog.records if "rejected event" in r.getMessage()]
    assert "outside" in record or "above" in record


@pytest.mark.parametrize(
    "element",
    [
        {**json.loads(BOOK), "x": 99_999},
        {**json.loads(BOOK), "t": -1},
        {**json.loads(BOOK), "b": [[1e308, 1.0]]},
        {**json.loads(BOOK), "a": [[1.0, -1.0]]},
        {**json.loads(AGG), "v": 1e308},
        {**json.loads(AGG), "s": 99_999_999_999_999_999_999},
        {**json.loads(AGG), "vw": MAX_PRICE, "v": MAX_SIZE},
        {**json.loads(AGG), "vw": None, "c": MAX_PRICE, "v": MAX_SIZE},
        {**json.loads(AGG), "z": 1e-300},
        {**json.loads(AGG), "ev": "XAS", "l": -1},
        {"ev": "FMV", "sym": "X:BTC-USD", "fmv": 1.0, "t": -1},
        {"ev": "FMV", "sym": "X:BTC-USD", "fmv": 1.0, "t": MAX_TIME + 1},
        {"ev": "FMV", "sym": "X:BTC-USD", "fmv": 1e308, "t": 1},
    ],
    ids=str,
)
def test_a_rare_event_out_of_range_is_rejected_as_it_decodes(element: dict[str, object]) -> None:
    d = Decoder()
    events = d.decode(frame(TRADE, msgspec.json.encode(element), QUOTE))
    assert [type(e) for e in events] == [Trade, Quote]
    assert (d.stats.events, d.stats.rejected_events) == (2, 1)


@pytest.mark.parametrize("pair", ["", "FOO", "??", "BTC-", "-USD", "BTC-USD-EUR"])
def test_a_pair_that_names_no_symbol_is_rejected_an_unwatched_one_is_other(pair: str) -> None:
    with pytest.raises(SymbolError):
        from_pair(pair)
    book = {**json.loads(BOOK), "pair": pair}
    agg = {**json.loads(AGG), "pair": pair}
    elements = [trade(pair=pair), quote(pair=pair), book, agg, trade(pair="ETH-USD"), trade()]
    for symbols in (["X:BTCUSD"], None):
        batcher = Batcher(symbols)
        for _ in range(2):  # the second time from the cache
            batch = batcher.build([Frame(AT, msgspec.json.encode(elements))])
            assert batch.books == [] and batch.aggregates.height == 0
            assert batch.trades["symbol"].to_list() == (
                ["X:BTCUSD"] if symbols else ["X:ETHUSD", "X:BTCUSD"]
            )
            assert batch.other == (1 if symbols else 0)
        stats = batcher.decoder.stats
        assert (stats.events, stats.rejected_events) == (4, 8)


def test_rejects_are_logged_a_few_times(caplog: pytest.LogCaptureFixture) -> None:
    batcher = Batcher(["X:BTCUSD"])
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            batcher.build([Frame(AT, msgspec.json.encode([trade(x=-1), trade(pair="??")]))])
    assert batcher.decoder.stats.rejected_events == 40
    assert len([r for r in caplog.records if "rejected event" in r.getMessage()]) == 5


finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.integers() | finite | st.sampled_from([0, MAX_TIME, MAX_PRICE, MAX_SIZE, 2**63])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"p": numbers, "s": numbers, "x": numbers, "t": st.integers(AT - 5_000, AT) | numbers}
        ),
        min_size=1,
        max_size=8,
    )
)
def test_arbitrary_trade_numbers_never_raise_and_kept_ones_make_bars(
    fields: list[dict[str, object]],
) -> None:
    batch, batcher = build(*[trade(**f) for f in fields])
    stats = batcher.decoder.stats
    assert batch.trades.height + stats.rejected_events == len(fields)
    kept = batch.trades
    assert kept["time"].is_between(0, MAX_TIME).all()
    assert kept["exchange"].is_between(0, MAX_EXCHANGE).all()
    assert (kept["price"] * kept["size"]).le(MAX_NOTIONAL).all()
    engine = BarEngine(BarOptions(timeframes=(1_000, 60_000)))
    engine.add_trades(kept)
    engine.finish()
