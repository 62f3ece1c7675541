"""What the frozen networks share at run time: the device, the precision and the frame batch format."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from extract.settings import PRECISIONS


class DeviceError(Exception):
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
    return resolved


def as_nhwc_uint8(frames) -> torch.Tensor:
    """A (N, H, W, 3) uint8 tensor on the CPU from an array, a tensor or a list of same-size frames."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)
    if isinstance(frames, np.ndarray):
        frames = np.ascontiguousarray(frames)  # torch refuses negative strides (flipped views)
    tensor = torch.as_tensor(frames)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames shaped (N, H, W, 3), got {tuple(tensor.shape)} {tensor.dtype}")
    if tensor.device.type == "cpu" and torch.cuda.is_available():
        tensor = tensor.pin_memory()  # lets the host-to-GPU copy run asynchronously
    return tensor


# Frames per network call. On the CPU the activations of many full frames spill out of the
# caches: RetinaFace on 640x360 and the context CNNs on 224x224 ran 1.5-3x faster in calls of
# 8 frames than of 64 (benchmarks/README.md). A GPU wants large batches.
CPU_FRAMES_PER_CALL = 8
GPU_FRAMES_PER_CALL = 64


def frames_per_call(device: torch.device) -> int:
    return CPU_FRAMES_PER_CALL if device.type == "cpu" else GPU_FRAMES_PER_CALL


def checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}'; choose from {', '.join(PRECISIONS)}")
    return precision


def prepared_for_inference(model: nn.Module, device: torch.device) -> nn.Module:
    """Frozen, in eval mode, its batch norms folded into convolutions, on `device`, with
    channels-last weights (faster convolutions on CPU and GPU)."""
    model = with_batch_norms_folded(model.eval().requires_grad_(False))
    return model.to(device, memory_format=torch.channels_last)


def with_batch_norms_folded(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d that directly follows a Conv2d in a Sequential folded into that convolution.

    In eval mode a batch norm is a fixed affine map per channel, which the convolution before
    it absorbs exactly (up to float rounding), saving a pass over the activations. Only pairs
    inside a Sequential are folded: there nothing else can read the convolution's own output.
    """
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return model


def as_channels_last(batch: torch.Tensor) -> torch.Tensor:
    return batch.contiguous(memory_format=torch.channels_last)


def autocast(device: torch.device, precision: str):
    """The context the networks run in: float32 as they are, else autocast to `precision`."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))
