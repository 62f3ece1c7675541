"""Where and how the networks run: the one reading of `--device` and `--precision` that
extract, train and predict share.

Light to import, because the command line takes its choices from here: torch is imported by
the functions that use it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

from errors import UserError

if TYPE_CHECKING:
    import torch

# How the networks compute: float32 as trained, or autocast to a 16-bit type, which is faster
# where the hardware has it (bfloat16 on recent CPUs, float16 on GPUs) and gives results close
# to, not equal to, float32's (benchmarks/README.md has the figures).
PRECISIONS = ("float32", "bfloat16", "float16")
DEFAULT_PRECISION = "float32"


class DeviceError(UserError):
    """A device this machine does not have; one line saying what to ask for instead."""


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(f"device '{device}' requested but this machine has {count} CUDA device(s), cuda:0 to"
                          f" cuda:{count - 1}; use one of those, or --device cpu")
    return resolved


def checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """The context the networks run in: float32 as they are, else autocast to `precision`."""
    import torch

    if checked_precision(precision) == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))
