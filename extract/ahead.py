"""Run an iterator a few items ahead of its consumer, in a background thread.

Stage 1 decodes clips with PyAV and runs networks with torch; both release the GIL while
they work, so decoding the next frames in a thread overlaps the networks' work on the
current ones. The queue between them is bounded, so memory stays flat however far the
decoder could run ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield what `items` yields, in order, while a thread computes up to `depth` items ahead.

    An exception raised by `items` is raised here, where its item would have been. Closing
    this generator early (break, an exception in the consumer) stops the thread at its next
    item and closes `items`, so open files are released.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        """Wait for room, but give up once the consumer has gone."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(_Raised(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
