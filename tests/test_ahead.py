"""The decode-ahead thread: order, errors where they happened, bounded memory, clean stops."""

from __future__ import annotations

import threading
import time

import pytest

from extract.ahead import ahead


def test_items_come_in_order_and_an_error_where_it_was_raised():
    def items():
        yield from range(5)
        raise ValueError("broken at 5")

    seen = []
    with pytest.raises(ValueError, match="broken at 5"):
        for item in ahead(items(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_the_producer_runs_at_most_depth_items_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    consumer = ahead(items(), depth=2)
    assert next(consumer) == 0
    time.sleep(0.3)
    # one handed over, two waiting in the queue, one made and waiting for room
    assert len(produced) <= 4
    consumer.close()


def test_stopping_early_closes_the_source_and_ends_the_thread():
    closed = threading.Event()

    def items():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    for item in ahead(items(), depth=1):
        if item == 3:
            break
    assert closed.wait(2)
    assert not any(t.name == "decode-ahead" for t in threading.enumerate())


def test_the_next_item_is_made_while_the_consumer_works_on_this_one():
    made = [threading.Event() for _ in range(3)]

    def items():
        for i in range(3):
            made[i].set()
            yield i

    for item in ahead(items(), depth=1):
        if item + 1 < len(made):
            assert made[item + 1].wait(5), "the producer waited for the consumer"
