"""Data shipped with polystream: the real BTC/USD minute bars the demo feed replays."""
