"""What stage 1 can be set to: its defaults, the face detectors and context backbones on offer,
and the settings of one extraction (`ExtractSettings`), checked (`check_options`).

Kept free of torch, torchvision and PyAV so that the command line can show its options and
help at once; the modules that do the work import these names from here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, fields
from pathlib import Path

from devices import DEFAULT_PRECISION
from errors import UserError
from features.layout import DEFAULT_ROOT, PART_FOLDER
from features.recipe import CONTEXT_DTYPES, NO_AUDIO, RECIPE_ATTRS, FeatureRecipe
from outputs import check_plain_name
from values import shown

DEFAULT_FPS = 5.0  # the paper's sampling rate
DEFAULT_MANIFEST = Path("manifests/cheavd.csv")
DEFAULT_CONTEXT_BACKBONE = "squeezenet1_1"  # the paper's
# Where extraction tasks run: processes on this machine, or a Dask cluster's workers.
BACKENDS = ("local", "dask")
DASK_INSTALL = "pip install 'caca-rnn[dask]'"
DEFAULT_DETECTOR = "mobilenet0.25"
DEFAULT_SCORE_THRESHOLD = 0.5
# Sampled frames queued across clips for the networks (extract --batch-size, and predict's).
DEFAULT_BATCH_SIZE = 64
FACE_BACKBONE = "mini-xception-fer2013"  # the face CNN's weights, by registry name


@dataclass(frozen=True)
class AudioFeatures:
    """A kind of audio features on offer: its analysis frames and what one sampled frame gets."""

    name: str
    frame: float  # seconds of one analysis frame
    hop: float  # seconds between analysis frames
    bands: int  # mel bands (0: not a spectrum)
    values: int  # features of one analysis frame; a sampled frame gets their mean and standard deviation
    package: str  # what to install for it, "" when it comes with this toolkit
    install: str


AUDIO_FEATURES = {
    a.name: a
    for a in (
        AudioFeatures("logmel", 0.025, 0.010, 64, 64, "", ""),
        # openSMILE's eGeMAPSv02 low-level descriptors, every 10 ms (extract/audio.py).
        AudioFeatures("egemaps", 0.020, 0.010, 0, 25, "opensmile",
                      "pip install 'caca-rnn[egemaps]' (openSMILE, audEERING's research licence: free for"
                      " non-commercial use, products need a commercial licence)"),
    )
}
DEFAULT_AUDIO = "logmel"
# Every track is mixed to mono and resampled to this rate: speech carries its information below
# 8 kHz, and both feature kinds are defined at 16 kHz.
AUDIO_RATE = 16_000


@dataclass(frozen=True)
class RetinaFaceVariant:
    backbone: str
    weight_name: str
    in_channels: tuple[int, int, int]
    out_channels: int


VARIANTS = {
    v.backbone: v
    for v in (
        RetinaFaceVariant("mobilenet0.25", "retinaface-mobilenet0.25", (64, 128, 256), 64),
        RetinaFaceVariant("resnet50", "retinaface-resnet50", (512, 1024, 2048), 256),
    )
}


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


class ExtractError(UserError):
    """A problem with the run's inputs or output folder that the user can fix; one line."""


@dataclass(frozen=True)
class ExtractSettings:
    """One extraction: the choices of its FeatureRecipe (the fields named as the recipe's, and
    `detector_backbone`, whose weights are the recipe's `detector`), and the job's own fields."""

    split: str
    manifest: Path = DEFAULT_MANIFEST
    out: Path = DEFAULT_ROOT
    fps: float = DEFAULT_FPS
    context_backbone: str = DEFAULT_CONTEXT_BACKBONE
    detector_backbone: str = DEFAULT_DETECTOR
    detector_threshold: float = DEFAULT_SCORE_THRESHOLD
    detect_every: int = 1  # full detection on every k-th sampled frame, tracking between; 1: the paper's
    device: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_size: int = 64
    workers: int = 1
    context_dtype: str = CONTEXT_DTYPES[0]
    save_crops: bool = False
    precision: str = DEFAULT_PRECISION
    audio_features: str = DEFAULT_AUDIO  # a key of AUDIO_FEATURES, or NO_AUDIO
    audio_rate: int = AUDIO_RATE
    audio_window: float | None = None  # seconds of audio per sampled frame; None: the frame step, 1 / fps
    num_shards: int | None = None
    shard_index: int | None = None
    backend: str = "local"
    scheduler: str | None = None
    overwrite: bool = False  # write into a folder holding more than a feature set's files

    @property
    def folder(self) -> Path:
        if self.num_shards is None:
            return self.out / self.split
        return self.out / self.split / PART_FOLDER.format(index=self.shard_index, count=self.num_shards)


# The settings a recipe holds as they are; the rest of a recipe follows from them, the code and
# the weights (`extract.clips.recipe_of`).
RECIPE_CHOICES = tuple(field.name for field in fields(ExtractSettings) if field.name in RECIPE_ATTRS)


def detector_backbone_of(weight_name: str) -> str:
    """The RetinaFace backbone (a key of VARIANTS) whose weights have this registry name."""
    return next(backbone for backbone, variant in VARIANTS.items() if variant.weight_name == weight_name)


def recipe_problems(recipe: FeatureRecipe) -> list[str]:
    """Why no extraction here could make features by `recipe`: values no recipe may hold (features.recipe's
    rules), or networks and audio features this toolkit does not have. Empty when one could."""
    known = {"detector": [variant.weight_name for variant in VARIANTS.values()],
             "face_backbone": [FACE_BACKBONE], "context_backbone": list(BACKBONES),
             "audio_features": [*AUDIO_FEATURES, NO_AUDIO]}
    unknown = [f"{key} {shown(getattr(recipe, key))} is not one this toolkit has ({', '.join(names)})"
               for key, names in known.items() if getattr(recipe, key) not in names]
    return recipe.problems() + unknown


@dataclass(frozen=True)
class NetworkChoice:
    """Exactly what `extract.clips.load_networks` reads: the networks a recipe names, how they compute, and where.
    Loaded networks are kept by it (`extract.pipeline`)."""

    detector_backbone: str  # a key of VARIANTS
    detector_threshold: float
    context_backbone: str  # a key of BACKBONES
    precision: str
    device: str | None

    @classmethod
    def of(cls, recipe: FeatureRecipe, device: str | None) -> NetworkChoice:
        return cls(detector_backbone_of(recipe.detector), recipe.detector_threshold, recipe.context_backbone,
                   recipe.precision, device)


def check_options(settings: ExtractSettings) -> None:
    """The option combinations a user can get wrong, as one-line ExtractErrors, before any work."""
    check_plain_name(settings.split, "split")
    if (settings.num_shards is None) != (settings.shard_index is None):
        raise ExtractError("--num-shards and --shard-index go together: give both (e.g. --num-shards 3 --shard-index 0)")
    if settings.num_shards is not None and not 0 <= settings.shard_index < settings.num_shards:
        raise ExtractError(
            f"--shard-index {settings.shard_index} is outside 0..{settings.num_shards - 1} (--num-shards {settings.num_shards})"
        )
    if settings.backend not in BACKENDS:
        raise ExtractError(f"--backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.backend == "local" and settings.scheduler is not None:
        raise ExtractError("--scheduler is used only with --backend dask")
    if settings.backend == "dask":
        if settings.scheduler is None:
            raise ExtractError("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")
        if settings.workers > 1:
            raise ExtractError("--workers is for the local backend; with --backend dask the cluster's workers run the tasks")
        try:
            importlib.import_module("distributed")
        except ImportError:
            raise ExtractError(f"--backend dask needs Dask's distributed package: {DASK_INSTALL}") from None
    check_audio_features(settings.audio_features)
    if settings.audio_window is not None and settings.audio_window < 2 * AUDIO_FEATURES[DEFAULT_AUDIO].hop:
        raise ExtractError(f"--audio-window {settings.audio_window} is shorter than two analysis frames' hop;"
                           f" give at least {2 * AUDIO_FEATURES[DEFAULT_AUDIO].hop} s")


def check_audio_features(name: str) -> None:
    """ExtractError when the audio features `name` need a package this machine lacks."""
    kind = AUDIO_FEATURES.get(name)
    if kind is not None and kind.package and importlib.util.find_spec(kind.package) is None:
        raise ExtractError(f"--audio-features {name} needs {kind.package}: {kind.install}")
