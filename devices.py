"""Where the networks run: one reading of `--device` for both stages (and predict)."""

from __future__ import annotations

import torch

from errors import UserError


class DeviceError(UserError):
    """A device this machine does not have; one line saying what to ask for instead."""


def resolve_device(device: str | None = None) -> torch.device:
    """The requested device, or CUDA when present, else CPU."""
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
