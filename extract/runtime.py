"""What the frozen networks share at run time: the precision, the frame batch format, the folded
input normalisation, and the process's memory allocator."""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


# glibc's malloc hands a freed block back to the OS once it is above its mmap threshold, or
# once the free space at the heap's top is above its trim threshold; the next network call
# then maps its activations afresh and the kernel zeroes every page again. Its thresholds
# adapt by default, not enough for calls of full frames: extracting 12 clips of 10 s took 3-5
# million page faults. Blocks up to 32 MiB (glibc's largest mmap threshold) from the heap, and
# up to 256 MiB kept free at its top, took it to 0.25 million and made extraction 5-15% faster
# (a trim threshold of 64 MiB did not help). Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536
# for its workers, which pins the mmap threshold at 128 KiB and made extraction 2x slower.
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def keep_freed_memory_for_reuse() -> bool:
    """Set this process's malloc thresholds as above; False where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


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


@dataclass(frozen=True)
class InputNormalisation:
    """What a network was trained to see in input channel c: (pixel[channels[c]] - mean[c]) / std[c],
    with pixel the frame's RGB values from 0 to 255 (channels (2, 1, 0) for a BGR network)."""

    channels: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def pixel_mean(self) -> tuple[float, float, float]:
        """The mean to subtract from each RGB channel of the frames, in RGB order."""
        by_pixel = dict(zip(self.channels, self.mean))
        return tuple(by_pixel[k] for k in range(3))


def prepared_for_inference(model: nn.Module, device: torch.device,
                           normalisation: InputNormalisation | None = None) -> nn.Module:
    """Frozen, in eval mode, its batch norms folded into convolutions, on `device`, with
    channels-last weights (faster convolutions on CPU and GPU).

    With `normalisation`, the input's channel order and scale are folded in too, and the
    model then takes `network_input(frames, normalisation, device)`.
    """
    model = with_batch_norms_folded(model.eval().requires_grad_(False))
    if normalisation is not None:
        fold_input_normalisation(first_convolution(model), normalisation)
    return model.to(device, memory_format=torch.channels_last)


def first_convolution(model: nn.Module) -> nn.Conv2d:
    """The convolution that reads the image: every network here registers it before any other."""
    conv = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    if conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"the first convolution of {type(model).__name__} does not read an RGB image: {conv}")
    return conv


@torch.no_grad()
def fold_input_normalisation(conv: nn.Conv2d, normalisation: InputNormalisation) -> None:
    """Make `conv` take pixels minus `pixel_mean()`, in RGB order, instead of its normalised input.

    A convolution is linear in each input channel, so reordering the channels and dividing
    by std moves exactly into its weights, saving passes over every frame. The mean stays
    outside: the convolution pads its input with zeros, and zero must keep meaning "the
    mean" at the borders.
    """
    weight = conv.weight.clone()
    for network_channel, pixel_channel in enumerate(normalisation.channels):
        conv.weight[:, pixel_channel] = weight[:, network_channel] / normalisation.std[network_channel]


def network_input(frames: torch.Tensor, normalisation: InputNormalisation, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 frames -> the float32 (N, 3, H, W) channels-last input of a model
    prepared for `normalisation`: one pass, subtracting the mean as the pixels become floats."""
    pixels = frames.to(device, non_blocking=True).permute(0, 3, 1, 2)  # a channels-last view
    mean = torch.tensor(normalisation.pixel_mean(), device=device).view(1, 3, 1, 1)
    return as_channels_last(pixels - mean)


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
