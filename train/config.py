"""What stage 2 can be set to: the models on offer, a training run's settings and their defaults.

Kept free of torch so that the command line can show its options and help at once; the
modules that do the work import these names from here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from devices import DEFAULT_PRECISION, PRECISIONS
from errors import UserError
from features.layout import DEFAULT_ROOT
from features.recipe import SETTING_DEFAULTS, attr_differences
from train.layout import run_name
from values import is_int, is_positive_number, problems_of

DEFAULT_RUNS = Path("runs")
DEFAULT_COMPARE = DEFAULT_RUNS / "compare"
DEFAULT_TRAIN_SPLIT = "train"
DEFAULT_VAL_SPLIT = "val"  # where runs are validated, and ensembles fitted
DEFAULT_TEST_SPLIT = "test"
# Clips a batch when a run scores a split (evaluate, an ensemble's fitting, compare's Table II).
EVAL_BATCH_SIZE = 64

# The paper's Table I models; TRAINABLE_MODELS adds its section VI spatiotemporal CNN and the
# models that also hear (none is the paper's: they read the voice stage 1 stores with audio on).
MODEL_NAMES = ("face", "context", "concat", "parallel", "caca", "caca-b")
SPATIOTEMPORAL = "c3d"
AUDIO_MODELS = ("audio", "face-audio", "caca-av")
TRAINABLE_MODELS = (*MODEL_NAMES, SPATIOTEMPORAL, *AUDIO_MODELS)
SEEING_MODELS = (*MODEL_NAMES, SPATIOTEMPORAL)  # the models that need no voice
ALIASES = {"caca-a": "caca"}

PRELOAD_CHOICES = ("auto", "always", "never")
# Table I reports the median of five seeds per model.
PAPER_SEEDS = 5
# The class index of a clip without a label (predicted, never scored).
UNLABELLED = -1
# How a run is carried out, not what it learns: a run with other values of these is the same run.
# Not the precision: its rounding changes the weights learnt and the scores, so it makes another run.
RUNTIME_FIELDS = ("out", "device", "num_workers", "preload")


class TrainError(UserError):
    """A problem with a run's inputs or folders that the user can fix; one line."""


@dataclass(frozen=True)
class TrainConfig:
    model: str
    features: Path = DEFAULT_ROOT
    train_split: str = DEFAULT_TRAIN_SPLIT
    val_split: str = DEFAULT_VAL_SPLIT
    out: Path | None = None
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    class_weighting: bool = False
    preload: str = "auto"
    # Training steps in float32, or under autocast to bfloat16 or float16 (weights stay float32).
    precision: str = DEFAULT_PRECISION

    @property
    def run_folder(self) -> Path:
        return self.out or DEFAULT_RUNS / run_name(self.model, self.seed)

    def to_json(self) -> dict:
        """config.json's object, which `from_json` reads back to this config exactly."""
        return {field: str(value) if isinstance(value, Path) else value for field, value in vars(self).items()}

    @classmethod
    def from_json(cls, data) -> TrainConfig:
        """The config of a config.json (or a checkpoint's), settings recorded only since a later version filled
        with the value runs had before (`SETTING_DEFAULTS`); ValueError saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object of settings")
        known = {field.name for field in fields(cls)}
        present = {**{key: value for key, value in SETTING_DEFAULTS.items() if key in known}, **data}
        unknown, missing = sorted(set(present) - known, key=str), sorted(known - set(present))
        if unknown or missing:
            raise ValueError(f"settings {', '.join(map(str, unknown))} unknown" if unknown
                             else f"settings {', '.join(missing)} missing")
        problems = problems_of(present, CONFIG_VALUES)
        if problems:
            raise ValueError(problems[0])
        return cls(**{key: Path(value) if key in PATH_FIELDS and value is not None else value
                      for key, value in present.items()})

    def differences(self, other: TrainConfig) -> list[str]:
        """How `other`'s settings differ from this config's in what decides the result ("key: theirs != ours")."""
        theirs, ours = other.to_json(), self.to_json()
        return attr_differences(theirs, ours, tuple(key for key in ours if key not in RUNTIME_FIELDS))


PATH_FIELDS = ("features", "out")


def is_optional_text(value) -> bool:
    return value is None or isinstance(value, str)


# What each setting may hold: config.json is checked by these rules, and the command line's options too.
CONFIG_VALUES = {
    "model": (lambda value: value in TRAINABLE_MODELS, f"one of {', '.join(TRAINABLE_MODELS)}"),
    "features": (lambda value: isinstance(value, str) and value != "", "a folder"),
    "train_split": (lambda value: isinstance(value, str), "a split name"),
    "val_split": (lambda value: isinstance(value, str), "a split name"),
    "out": (is_optional_text, "a folder or null"),
    "epochs": (lambda value: is_int(value) and value >= 1, "an int of 1 or more"),
    "batch_size": (lambda value: is_int(value) and value >= 1, "an int of 1 or more"),
    "lr": (is_positive_number, "a positive number"),
    "seed": (is_int, "an int"),
    "device": (is_optional_text, "a device name or null"),
    "num_workers": (lambda value: is_int(value) and value >= 0, "an int of 0 or more"),
    "class_weighting": (lambda value: isinstance(value, bool), "true or false"),
    "preload": (lambda value: value in PRELOAD_CHOICES, f"one of {', '.join(PRELOAD_CHOICES)}"),
    "precision": (lambda value: value in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
}


def parse_models(text: str) -> list[str]:
    """Comma-separated model names (aliases allowed) -> canonical names; ValueError names the unknown."""
    names = [ALIASES.get(name.strip(), name.strip()) for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRAINABLE_MODELS]
    if unknown or not names:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TRAINABLE_MODELS)}"
        )
    return names
