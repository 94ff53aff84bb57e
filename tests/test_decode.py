import logging

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from polystream.decode import Decoder
from polystream.events import (
    Aggregate,
    Book,
    FairValue,
    Quote,
    SecondAggregate,
    Status,
    Trade,
)
from polystream.schema import SIDE_BUY, SIDE_SELL

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
