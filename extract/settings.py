"""What stage 1 can be set to: its defaults and the context backbones on offer.

Kept free of torch, torchvision and PyAV so that the command line can show its options and
help at once; the modules that do the work import these names from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_FPS = 5.0  # the paper's sampling rate
DEFAULT_MANIFEST = Path("manifests/cheavd.csv")
DEFAULT_CONTEXT_BACKBONE = "squeezenet1_1"  # the paper's
# How the frozen CNNs compute: float32 as trained, or autocast to a 16-bit type, which is
# faster where the hardware has it (bfloat16 on recent CPUs, float16 on GPUs) and gives
# features close to, not equal to, float32's (benchmarks/README.md has the figures).
PRECISIONS = ("float32", "bfloat16", "float16")
DEFAULT_PRECISION = "float32"
# Where extraction tasks run: processes on this machine, or a Dask cluster's workers.
BACKENDS = ("local", "dask")


@dataclass(frozen=True)
class ContextBackbone:
    name: str  # also the name of its constructor in torchvision.models
    weight_name: str
    channels: int
    pool_to: int  # the last feature map is average-pooled to pool_to x pool_to, then flattened
    pooling: str

    @property
    def feature_dim(self) -> int:
        return self.channels * self.pool_to * self.pool_to


BACKBONES = {
    b.name: b
    for b in (
        ContextBackbone(
            "squeezenet1_1", "squeezenet1_1-imagenet", 512, 7,
            "adaptive average pooling of features (512x13x13) to 512x7x7",
        ),
        ContextBackbone(
            "mobilenet_v2", "mobilenetv2-imagenet", 1280, 1, "global average pooling of features (1280x7x7)",
        ),
    )
}


def backbone_for(name: str) -> ContextBackbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown context backbone '{name}'; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]
