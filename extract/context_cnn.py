"""The context CNN: a frozen ImageNet network over the whole frame (the paper's context stream).

The paper centre-crops each frame to a square, scales it to 224x224 and uses SqueezeNet's
last convolutional output, pooled to 512x7x7 = 25088 values. MobileNetV2 is offered too
because its weights can be had offline; its feature is the usual global-average-pooled
1280-d embedding. Each backbone's feature size is stated in `extract/settings.py` and recorded
with the features, never assumed elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from devices import DEFAULT_PRECISION, autocast, checked_precision, resolve_device
from extract.settings import DEFAULT_CONTEXT_BACKBONE, ContextBackbone, backbone_for
from extract.runtime import (
    InputNormalisation, as_nhwc_uint8, frames_per_call, network_input, prepared_for_inference,
)
from extract.weights import load_state_dict_checked, verified_path

CONTEXT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = InputNormalisation(
    channels=(0, 1, 2), mean=tuple(255 * m for m in IMAGENET_MEAN), std=tuple(255 * s for s in IMAGENET_STD)
)


def build_backbone(backbone: ContextBackbone) -> nn.Module:
    return getattr(torchvision.models, backbone.name)(weights=None)


def centre_square(frames: torch.Tensor, size: int = CONTEXT_SIZE) -> torch.Tensor:
    """(N,3,H,W) -> (N,3,size,size), same dtype: the largest centred square, scaled (the paper's context crop)."""
    height, width = frames.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = frames[..., top : top + side, left : left + side]
    if side == size:
        return square
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def context_crops(frames: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) uint8 frames -> (N,224,224,3) uint8: the paper's context stream images.

    Scaled as uint8, which torch's antialiased bilinear resize does directly on channels-last
    pixels (on the CPU): 9x faster than through float, and at most one level (of 255) different.
    """
    return centre_square(frames.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ContextCNN:
    """Frozen context network: RGB frames of any size in, one feature vector per frame out."""

    def __init__(self, backbone: str = DEFAULT_CONTEXT_BACKBONE, weights_path: Path | None = None,
                 device: str | None = None, precision: str = DEFAULT_PRECISION):
        self.backbone = backbone_for(backbone)
        self.device = resolve_device(device)
        self.precision = checked_precision(precision)
        self.model = build_backbone(self.backbone)
        self.weights_path = weights_path or verified_path(self.backbone.weight_name)
        load_state_dict_checked(self.model, self.weights_path, f"{backbone} (ImageNet)")
        self.pretrained = True
        self.model = prepared_for_inference(self.model, self.device, NORMALISATION)

    @classmethod
    def random_init(cls, backbone: str, seed: int = 0, device: str | None = None,
                    precision: str = DEFAULT_PRECISION) -> "ContextCNN":
        """The architecture with random weights, for tests where the ImageNet file is unavailable.

        Its `pretrained` is False and `weights_label` says so: features from it carry no meaning.
        """
        self = cls.__new__(cls)
        self.backbone = backbone_for(backbone)
        self.device = resolve_device(device)
        self.precision = checked_precision(precision)
        torch.manual_seed(seed)
        self.model = prepared_for_inference(build_backbone(self.backbone), self.device, NORMALISATION)
        self.weights_path = None
        self.pretrained = False
        self.seed = seed
        return self

    @property
    def weights_label(self) -> str:
        if self.pretrained:
            return f"{self.backbone.weight_name} ({self.weights_path.name})"
        return f"RANDOM INIT (seed {self.seed}), not pretrained"

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def _prepare(self, frames) -> torch.Tensor:
        """Frames of any size -> the model's input for their 224x224 squares, on the device; cropped
        on the CPU, as stage 1 crops them, so a frame gives the same feature whether it came whole
        or cropped."""
        return network_input(context_crops(as_nhwc_uint8(frames)), NORMALISATION, self.device)

    def _features(self, frames: torch.Tensor) -> torch.Tensor:
        ready = self._prepare(frames)  # preprocessing stays float32
        with autocast(self.device, self.precision):
            maps = self.model.features(ready)
        return F.adaptive_avg_pool2d(maps.float(), self.backbone.pool_to).flatten(1).cpu()

    @torch.inference_mode()
    def embed(self, frames, batch_size: int | None = None) -> torch.Tensor:
        """(N, H, W, 3) uint8 RGB frames -> (N, feature_dim) float32 features on the CPU.

        `batch_size` frames per call; by default the device's best (`frames_per_call`).
        """
        frames = as_nhwc_uint8(frames)
        batch_size = batch_size or frames_per_call(self.device)
        out = [self._features(frames[i : i + batch_size]) for i in range(0, len(frames), batch_size)]
        return torch.cat(out) if out else torch.zeros((0, self.feature_dim))

    @torch.inference_mode()
    def classify(self, frames) -> torch.Tensor:
        """ImageNet class logits (N, 1000): the check that the weights and preprocessing are right."""
        ready = self._prepare(frames)
        with autocast(self.device, self.precision):
            return self.model(ready).float().cpu()
