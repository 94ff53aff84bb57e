"""Frames (bytes) → typed events, on the pipeline thread.

One decoder per process, built once. A frame decodes in one pass; only when that fails is it taken
apart element by element, so one bad element costs that element alone. Nothing raised by input
escapes: rejects are counted and the first few are logged. What only shows once events are columns
(a trade's range, a pair that names no symbol) is rejected by `batch` through `reject`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from .events import EVENT_TYPES, Event

log = logging.getLogger(__name__)

MAX_LOGGED_REJECTS = 5


class _Tag(msgspec.Struct):
    ev: str


class DecodeStats(msgspec.Struct):
    """Counters since the decoder was made."""

    frames: int = 0
    events: int = 0
    malformed_frames: int = 0
    rejected_events: int = 0
    unknown_events: int = 0
    # events per channel (the feed's `ev`: XT, XQ, XA, XAS, XL2…), counted as a `Batcher` or a
    # shard's decoded pass takes them; they add up to `events`
    channels: dict[str, int] = msgspec.field(default_factory=dict)


class Decoder:
    """Decode feed frames into `Event` structs; never raises on bad input."""

    def __init__(self) -> None:
        self._decode_frame = msgspec.json.Decoder(list[Event]).decode
        self._decode_frames = msgspec.json.Decoder(list[list[Event]]).decode
        self._raw_frame = msgspec.json.Decoder(list[msgspec.Raw])
        self._one = msgspec.json.Decoder(Event)
        self._tag = msgspec.json.Decoder(_Tag)
        self.stats = DecodeStats()
        self._logged = 0

    def decode(self, frame: bytes | str) -> list[Event]:
        """Return the events of one frame, skipping (and counting) any element that is malformed."""
        stats = self.stats
        stats.frames += 1
        try:
            events = self._decode_frame(frame)
        except msgspec.DecodeError:
            events = self._salvage(frame)
        stats.events += len(events)
        return events

    def decode_many(self, frames: list[bytes]) -> list[list[Event]]:
        """The events of each frame, as `decode` would give them, in one pass when all are
        well-formed (one call instead of one per frame); otherwise frame by frame."""
        try:
            decoded = self._decode_frames(b"[" + b",".join(frames) + b"]")
        except msgspec.DecodeError:
            return [self.decode(f) for f in frames]
        stats = self.stats
        stats.frames += len(frames)
        stats.events += sum(map(len, decoded))
        return decoded

    def count(self, channel: str, n: int) -> None:
        """Count `n` decoded events of `channel` (see `DecodeStats.channels`)."""
        if n:
            channels = self.stats.channels
            channels[channel] = channels.get(channel, 0) + n

    def _salvage(self, frame: bytes | str) -> list[Event]:
        try:
            parts = self._raw_frame.decode(frame)
        except msgspec.DecodeError:
            try:  # a lone object instead of an array
                return [self._one.decode(frame)]
            except msgspec.DecodeError as exc:
                self.stats.malformed_frames += 1
                self._log("malformed frame", exc, frame)
                return []
        events: list[Event] = []
        for part in parts:
            try:
                events.append(self._one.decode(part))
            except msgspec.DecodeError as exc:
                if self._is_unknown_type(part):
                    self.stats.unknown_events += 1
                else:
                    self.stats.rejected_events += 1
                    self._log("rejected event", exc, part)
        return events

    def reject(self, reason: str, events: Sequence[object]) -> None:
        """Count `events`, decoded (and counted) already, as rejected after all; the first few
        rejects are logged with `reason`."""
        stats = self.stats
        stats.events -= len(events)
        stats.rejected_events += len(events)
        channels = stats.channels
        for event in events:
            channel = channel_of(type(event))
            channels[channel] = channels.get(channel, 0) - 1
        for event in events[: max(0, MAX_LOGGED_REJECTS - self._logged)]:
            self._log("rejected event", reason, msgspec.json.encode(event))

    def _is_unknown_type(self, part: msgspec.Raw) -> bool:
        try:
            return self._tag.decode(part).ev not in EVENT_TYPES
        except msgspec.DecodeError:
            return False

    def _log(self, what: str, exc: object, data: bytes | str | msgspec.Raw) -> None:
        if self._logged >= MAX_LOGGED_REJECTS:
            return
        self._logged += 1
        text = bytes(data) if isinstance(data, msgspec.Raw) else data
        shown = text[:200] if isinstance(text, str) else text[:200].decode("utf-8", "replace")
        log.warning("%s (%s): %s", what, exc, shown)


def channel_of(kind: type) -> str:
    """The channel of a decoded event's type: its `ev` tag."""
    config = getattr(kind, "__struct_config__", None)
    return str(getattr(config, "tag", None) or "other")
