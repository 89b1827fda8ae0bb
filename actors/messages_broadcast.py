"""Messages to the Broadcaster: durable event batches to fan out to firehose consumers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Told by the sequencer after a batch is durable in the event log.

    ``events`` holds ``(seq, frame)`` pairs in ascending ``seq`` order; each frame is a complete
    output message (header + body DAG-CBOR) that already carries the relay ``seq``.
    """

    events: tuple[tuple[int, bytes], ...]
