"""RetinaFace face detector (Deng et al. 2019), written to load the public biubug6 checkpoints.

Module and parameter names follow that checkpoint layout (`body.stage1...`, `fpn.output1...`,
`ssh1.conv3X3...`, `ClassHead.0.conv1x1...`), so the published files load strictly. The
network is: backbone (MobileNet-0.25 or ResNet-50) -> 3-level FPN -> an SSH context module
per level -> per-anchor class, box and 5-landmark heads over fixed prior boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from devices import DEFAULT_PRECISION, autocast, checked_precision, resolve_device
from extract.runtime import (
    InputNormalisation, as_nhwc_uint8, frames_per_call, network_input, prepared_for_inference,
)
from extract.settings import DEFAULT_DETECTOR, DEFAULT_SCORE_THRESHOLD, VARIANTS, RetinaFaceVariant
from extract.weights import load_state_dict_checked, verified_path

# The checkpoints were trained on BGR images (OpenCV) with these per-channel means subtracted.
BGR_MEAN = (104.0, 117.0, 123.0)
NORMALISATION = InputNormalisation(channels=(2, 1, 0), mean=BGR_MEAN, std=(1.0, 1.0, 1.0))
VARIANCE = (0.1, 0.2)
STEPS = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
DEFAULT_NMS_THRESHOLD = 0.4


def conv_bn(inp: int, out: int, stride: int = 1, leaky: float = 0.0, kernel: int = 3, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(inp, out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(out)]
    if act:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


def conv_dw(inp: int, out: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1, each with BN and leaky ReLU (indices match the checkpoint)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, out, 1, 1, 0, bias=False),
        nn.BatchNorm2d(out),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 at width 0.25; returns the stride-8, -16 and -32 feature maps."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class ResNet50Body(nn.Module):
    """torchvision's ResNet-50 without its head; returns layer2, layer3 and layer4 outputs."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def _leak_for(channels: int) -> float:
    # The published models use leaky ReLU only in their narrow (<= 64 channel) variant.
    return 0.1 if channels <= 64 else 0.0


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out: int):
        super().__init__()
        leaky = _leak_for(out)
        self.output1 = conv_bn(in_channels[0], out, leaky=leaky, kernel=1)
        self.output2 = conv_bn(in_channels[1], out, leaky=leaky, kernel=1)
        self.output3 = conv_bn(in_channels[2], out, leaky=leaky, kernel=1)
        self.merge1 = conv_bn(out, out, leaky=leaky)
        self.merge2 = conv_bn(out, out, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        p5 = self.output3(feats[2])
        p4 = self.output2(feats[1]) + F.interpolate(p5, size=feats[1].shape[-2:], mode="nearest")
        p4 = self.merge2(p4)
        p3 = self.output1(feats[0]) + F.interpolate(p4, size=feats[0].shape[-2:], mode="nearest")
        return [self.merge1(p3), p4, p5]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields from stacked 3x3s."""

    def __init__(self, channels: int):
        super().__init__()
        leaky = _leak_for(channels)
        self.conv3X3 = conv_bn(channels, channels // 2, act=False)
        self.conv5X5_1 = conv_bn(channels, channels // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn(channels // 4, channels // 4, act=False)
        self.conv7X7_2 = conv_bn(channels // 4, channels // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn(channels // 4, channels // 4, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        branches = [self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))]
        return F.relu(torch.cat(branches, dim=1))


class Head(nn.Module):
    """A 1x1 conv predicting `values` numbers for each of the 2 anchors at every location."""

    def __init__(self, channels: int, values: int, anchors: int = 2):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """Raw network: returns box offsets (N,A,4), class logits (N,A,2), landmark offsets (N,A,10)."""

    def __init__(self, variant: RetinaFaceVariant):
        super().__init__()
        self.body = MobileNetV1Body() if variant.backbone == "mobilenet0.25" else ResNet50Body()
        c = variant.out_channels
        self.fpn = FPN(variant.in_channels, c)
        self.ssh1, self.ssh2, self.ssh3 = SSH(c), SSH(c), SSH(c)
        self.ClassHead = nn.ModuleList(Head(c, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(c, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(c, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = self.fpn(self.body(x))
        feats = [ssh(f) for ssh, f in zip((self.ssh1, self.ssh2, self.ssh3), levels)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1)
        return boxes, logits, landmarks


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """Anchor centres and sizes (cx, cy, w, h), relative to the image, in the heads' output order."""
    priors = []
    for step, sizes in zip(STEPS, ANCHOR_SIZES):
        rows, cols = -(-height // step), -(-width // step)
        for i, j in product(range(rows), range(cols)):
            for size in sizes:
                priors.append(((j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height))
    return torch.tensor(priors, dtype=torch.float32)


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD-style decoding to (x1, y1, x2, y2) relative coordinates."""
    centres = priors[..., :2] + offsets[..., :2] * VARIANCE[0] * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(offsets[..., 2:] * VARIANCE[1])
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)


def decode_landmarks(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Five (x, y) points relative to the image, shape (..., 5, 2)."""
    points = offsets.reshape(*offsets.shape[:-1], 5, 2)
    return priors[..., None, :2] + points * VARIANCE[0] * priors[..., None, 2:]


@dataclass
class FaceDetections:
    """Faces found in one frame, best first, in the frame's pixel coordinates."""

    boxes: np.ndarray  # (K, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (K,) float32
    landmarks: np.ndarray  # (K, 5, 2) float32: left eye, right eye, nose, mouth left, mouth right


class RetinaFaceDetector:
    """Frozen RetinaFace: a batch of same-size RGB frames in, per-frame detections out."""

    def __init__(
        self,
        backbone: str = DEFAULT_DETECTOR,
        weights_path: Path | None = None,
        device: str | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        nms_threshold: float = DEFAULT_NMS_THRESHOLD,
        precision: str = DEFAULT_PRECISION,
    ):
        if backbone not in VARIANTS:
            raise ValueError(f"unknown RetinaFace backbone '{backbone}'; choose from {', '.join(VARIANTS)}")
        self.variant = VARIANTS[backbone]
        self.weights_path = weights_path or verified_path(self.variant.weight_name)
        self.device = resolve_device(device)
        if not 0.0 < score_threshold < 1.0:
            raise ValueError(f"score_threshold must be between 0 and 1, not {score_threshold}")
        self.score_threshold = score_threshold
        self._margin_threshold = math.log(score_threshold / (1.0 - score_threshold))
        self.nms_threshold = nms_threshold
        self.precision = checked_precision(precision)
        self.model = RetinaFace(self.variant)
        load_state_dict_checked(self.model, self.weights_path, f"RetinaFace-{backbone}")
        self.model = prepared_for_inference(self.model, self.device, NORMALISATION)
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    def _priors_for(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self._priors:
            self._priors[(height, width)] = prior_boxes(height, width).to(self.device)
        return self._priors[(height, width)]

    def _prepare(self, frames: torch.Tensor) -> torch.Tensor:
        return network_input(frames, NORMALISATION, self.device)

    @torch.inference_mode()
    def detect(self, frames) -> list[FaceDetections]:
        """Detect faces in (N, H, W, 3) uint8 RGB frames (array, tensor or list of same-size arrays)."""
        frames = as_nhwc_uint8(frames)
        step = frames_per_call(self.device)
        batches = (frames[start : start + step] for start in range(0, len(frames), step))
        return [found for batch in batches for found in self._detect_batch(batch)]

    def _detect_batch(self, frames: torch.Tensor) -> list[FaceDetections]:
        n, height, width = frames.shape[:3]
        ready = self._prepare(frames)  # preprocessing stays float32
        with autocast(self.device, self.precision):
            offsets, logits, landmark_offsets = self.model(ready)
        # A softmax over two classes is the sigmoid of their difference: comparing the
        # difference with the threshold's logit spares the exp of every anchor (16800 in a
        # 640x360 frame), and only the few anchors above it are decoded.
        margin = (logits[..., 1] - logits[..., 0]).float()
        frame, anchor = torch.nonzero(margin > self._margin_threshold, as_tuple=True)
        priors = self._priors_for(height, width)[anchor]
        scale = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        boxes = decode_boxes(offsets[frame, anchor].float(), priors) * scale.repeat(2)
        landmarks = decode_landmarks(landmark_offsets[frame, anchor].float(), priors) * scale
        scores = margin[frame, anchor].sigmoid()
        # The few candidates come to the host once per call, not once per frame and array.
        frame, boxes, scores, landmarks = (t.cpu() for t in (frame, boxes, scores, landmarks))
        return [self._suppressed(frame == i, boxes, scores, landmarks) for i in range(n)]

    def _suppressed(self, mine: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                    landmarks: torch.Tensor) -> FaceDetections:
        """One frame's faces after NMS, best first. Frame by frame, not torchvision's batched_nms,
        whose offsets by frame number would make a box's fate depend on its frame's place in the call."""
        rows = torch.nonzero(mine).flatten()
        kept = rows[torchvision.ops.nms(boxes[rows], scores[rows], self.nms_threshold)]
        return FaceDetections(boxes[kept].numpy(), scores[kept].numpy(), landmarks[kept].numpy())
