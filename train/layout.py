"""What a run folder holds and what its files are called: the one definition every command reads.

Light (no torch), so that the command line and the demo can name these files at once.

A training run (`train`, and each run of `compare`):
  config.json     the run's settings (train.config.TrainConfig)
  features.json   the attributes of the features it was trained on
  epochs.csv      loss, mAP and accuracy of every epoch
  best.pt         the weights of the epoch with the best val mAP, and what they need to load
  last.pt         while the run is unfinished, its state after the latest epoch (train/resume.py)
  metrics.json    the best epoch's val metrics, written last: the run is finished
An ensemble (`ensemble`) holds ensemble.json, features.json and metrics.json. `evaluate`
writes metrics.json, predictions.csv and confusion.png into the run's eval-SPLIT/.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.json"
FEATURES_FILE = "features.json"
EPOCHS_FILE = "epochs.csv"
CHECKPOINT = "best.pt"
LAST_STATE = "last.pt"
METRICS_FILE = "metrics.json"
# A run or an ensemble is finished once its metrics are written, which is done last.
COMPLETE_MARK = METRICS_FILE
ENSEMBLE_FILE = "ensemble.json"
RUN_FILES = (CONFIG_FILE, FEATURES_FILE, EPOCHS_FILE, CHECKPOINT, LAST_STATE, COMPLETE_MARK)
ENSEMBLE_FILES = (ENSEMBLE_FILE, FEATURES_FILE, COMPLETE_MARK)
EVAL_PREFIX = "eval-"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_FILE = "confusion.png"


RUN_NAME = "{model}-seed{seed}"


def run_name(model: str, seed: int) -> str:
    """The folder of one model and seed, under runs/ or a comparison's folder."""
    return RUN_NAME.format(model=model, seed=seed)


def run_name_pattern(models: tuple[str, ...]) -> re.Pattern:
    """Matches the run names (`run_name`) of these models and any seed."""
    model = "|".join(map(re.escape, models))
    return re.compile(re.escape(RUN_NAME).replace(re.escape("{model}"), f"(?:{model})").replace(
        re.escape("{seed}"), r"\d+"))


def evaluation_folder(run: Path, split: str) -> Path:
    """Where `evaluate` writes a run's scores on `split`."""
    return Path(run) / f"{EVAL_PREFIX}{split}"
