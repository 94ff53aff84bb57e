import pytest

from polystream.errors import SymbolError
from polystream.symbols import from_pair, normalize, to_pair


@pytest.mark.parametrize(
    ("text", "rest", "pair"),
    [
        ("X:BTCUSD", "X:BTCUSD", "BTC-USD"),
        ("BTC-USD", "X:BTCUSD", "BTC-USD"),
        ("btcusd", "X:BTCUSD", "BTC-USD"),
        ("eth/eur", "X:ETHEUR", "ETH-EUR"),
        ("X:ETHUSDT", "X:ETHUSDT", "ETH-USDT"),
        ("solusdc", "X:SOLUSDC", "SOL-USDC"),
        (" x:dogeusd ", "X:DOGEUSD", "DOGE-USD"),
    ],
)
def test_symbol_forms_round_trip(text: str, rest: str, pair: str) -> None:
    assert normalize(text) == rest
    assert to_pair(text) == pair
    assert from_pair(pair) == rest


def test_fmv_symbol_maps_back() -> None:
    assert from_pair("X:BTC-USD") == "X:BTCUSD"


@pytest.mark.parametrize("bad", ["", "BTC", "X:", "BTC USD", "BTC-USD-EUR", "$$$", "XYZABC"])
def test_unknown_forms_are_one_sentence(bad: str) -> None:
    with pytest.raises(SymbolError) as info:
        normalize(bad)
    message = str(info.value)
    assert message.startswith("Unknown symbol form") and message.endswith(".")
    assert "X:BTCUSD" in message
