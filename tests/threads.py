"""Torch threads of runs in the test process, so their features can equal a CLI subprocess's bit for bit.

Torch on another number of threads sums in another order (measured here: up to 0.0044 on face
maps between one and two threads), so a run in this process equals a fresh process's only on
as many threads, and a worker's (which gets its share of the cores) only on that share.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# A fresh process's, read when the test modules are collected, before any test changes it.
FRESH_PROCESS_THREADS = torch.get_num_threads()


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
