"""What stage 2 can be set to: the models on offer, a training run's settings and their defaults.

Kept free of torch so that the command line can show its options and help at once; the
modules that do the work import these names from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from devices import DEFAULT_PRECISION
from features.layout import DEFAULT_ROOT
from features.recipe import MISSING
from train.layout import run_name

DEFAULT_RUNS = Path("runs")
DEFAULT_COMPARE = DEFAULT_RUNS / "compare"
DEFAULT_TEST_SPLIT = "test"

# The paper's Table I models; TRAINABLE_MODELS adds its section VI spatiotemporal CNN.
MODEL_NAMES = ("face", "context", "concat", "parallel", "caca", "caca-b")
SPATIOTEMPORAL = "c3d"
TRAINABLE_MODELS = (*MODEL_NAMES, SPATIOTEMPORAL)
ALIASES = {"caca-a": "caca"}

PRELOAD_CHOICES = ("auto", "always", "never")
# Table I reports the median of five seeds per model.
PAPER_SEEDS = 5
# The class index of a clip without a label (predicted, never scored).
UNLABELLED = -1
# How a run is carried out, not what it learns: a run with other values of these is the same run.
# Not the precision: its rounding changes the weights learnt and the scores, so it makes another run.
RUNTIME_FIELDS = ("out", "device", "num_workers", "preload")
# Settings recorded in config.json only since a later version, with the value every run before
# them was trained with: a config.json without one is read as having that value.
SETTING_DEFAULTS = {"precision": DEFAULT_PRECISION}


@dataclass(frozen=True)
class TrainConfig:
    model: str
    features: Path = DEFAULT_ROOT
    train_split: str = "train"
    val_split: str = "val"
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
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    def differences(self, stored: dict) -> list[str]:
        """How a run's stored config.json differs from this config in what decides the result."""
        mine = {k: v for k, v in self.to_json().items() if k not in RUNTIME_FIELDS}
        theirs = {**SETTING_DEFAULTS, **stored}
        return [f"{key} {theirs.get(key, MISSING)!r} there, {value!r} here"
                for key, value in mine.items() if theirs.get(key, MISSING) != value]


def parse_models(text: str) -> list[str]:
    """Comma-separated model names (aliases allowed) -> canonical names; ValueError names the unknown."""
    names = [ALIASES.get(name.strip(), name.strip()) for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRAINABLE_MODELS]
    if unknown or not names:
        raise ValueError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TRAINABLE_MODELS)}"
        )
    return names
