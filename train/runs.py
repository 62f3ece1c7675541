"""A run folder as one typed, checked value (`LoadedRun`): what evaluate, predict, ensemble, compare and the demo use.

A training run's files (train/layout.py names them) are read here and nowhere else: best.pt
(`Checkpoint`, written by the training loop through it), config.json (`TrainConfig`),
metrics.json (`Metrics`); and an ensemble's ensemble.json (`EnsembleSpec`, written by
train/ensemble.py through it), whose members load like any run. The result is one
`LoadedRun`: its settings, the recipe and attributes of the features it learnt from, its
classes, its model and its metrics.

Nothing in a run folder is trusted. Torch files are loaded with torch's weights-only unpickler,
which refuses any object but tensors and plain values, so loading never runs code; settings,
classes and feature attributes are checked; weights must have the shapes of the model they
claim before that model is built. Anything else is one TrainError naming the file.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from features.recipe import FeatureRecipe
from outputs import read_json_object, write_atomically, write_json
from train.config import TrainConfig, TrainError
from train.data import check_comparable
from train.layout import CHECKPOINT, COMPLETE_MARK, ENSEMBLE_FILE
from train.metrics import Metrics
from train.models import WeightedEnsemble, build_model, feature_dims
from values import are_distinct_names, is_int, is_number

ENSEMBLE_MODEL = "ensemble"
CHECKPOINT_KEYS = ("model", "config", "classes", "attrs", "epoch")


def loaded(path: Path, device: torch.device | str = "cpu") -> tuple[object, str | None]:
    """A file of a run folder saved by torch.save (best.pt, last.pt), loaded with torch's
    weights-only unpickler, which refuses any object but tensors and plain values, so loading
    never runs code: (contents, None), or (None, what is wrong with the file)."""
    try:
        return torch.load(path, map_location=device, weights_only=True), None
    except FileNotFoundError:
        return None, "is missing"
    except pickle.UnpicklingError:
        return None, ("not loaded: it is damaged, or holds Python objects besides tensors and plain values, which"
                      " loading could run as code (this toolkit never writes those)")
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        return None, f"not readable ({first_sentence(str(exc)) or type(exc).__name__})"


def first_sentence(text: str) -> str:
    return text.splitlines()[0].split(". ")[0] if text else ""


def recipe_problem(attrs) -> str | None:
    """What keeps feature attributes (a checkpoint's, features.json's) from being a recipe's; None when nothing."""
    if not isinstance(attrs, dict):
        return "its feature attributes are not a table"
    try:
        recipe = FeatureRecipe.from_attrs(attrs)
    except ValueError as exc:
        return f"its feature attributes have {exc}"
    problems = recipe.problems()
    return f"its feature attributes are not a recipe's ({problems[0]})" if problems else None


@dataclass(frozen=True)
class Checkpoint:
    """best.pt: the best epoch's weights and what loading them needs. On disk, a dict of CHECKPOINT_KEYS of
    tensors and plain values only, as every run of this toolkit has written it."""

    weights: dict[str, torch.Tensor]
    config: TrainConfig
    classes: list[str]
    attrs: dict  # the attributes of the features it learnt from
    epoch: int

    def save(self, path: Path) -> None:
        contents = {"model": self.weights, "config": self.config.to_json(), "classes": self.classes,
                    "attrs": self.attrs, "epoch": self.epoch}
        write_atomically(path, lambda temporary: torch.save(contents, temporary))

    @classmethod
    def read(cls, path: Path, device: torch.device | str) -> Checkpoint:
        """The checkpoint at `path`; TrainError naming it and what is wrong with it."""
        if not path.is_file():
            raise TrainError(f"{path.parent} has no {CHECKPOINT}: is it a finished training run?")
        checkpoint, problem = cls.checked(path, device)
        if problem:
            raise TrainError(f"{path}: {problem}; retrain the run")
        return checkpoint

    @classmethod
    def checked(cls, path: Path, device: torch.device | str) -> tuple[Checkpoint | None, str | None]:
        """(the checkpoint, None), or (None, what keeps the file at `path` from being one)."""
        contents, problem = loaded(path, device)
        if problem:
            return None, f"{path.name} {problem}"
        if not isinstance(contents, dict) or any(key not in contents for key in CHECKPOINT_KEYS):
            return None, f"not a training checkpoint (it needs {', '.join(CHECKPOINT_KEYS)})"
        try:
            config = TrainConfig.from_json(contents["config"])
        except ValueError as exc:
            return None, f"its settings are not a run's ({exc})"
        classes, attrs, weights, epoch = (contents[key] for key in ("classes", "attrs", "model", "epoch"))
        if not (are_distinct_names(classes) and len(classes) >= 2):
            return None, "its classes are not a list of two or more distinct names"
        problem = recipe_problem(attrs)
        if problem:
            return None, problem
        if not isinstance(weights, dict) or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()
        ):
            return None, "its model weights are not a table of named tensors"
        if not (is_int(epoch) and epoch >= 1):
            return None, "its epoch is not a number of 1 or more"
        return cls(weights, config, classes, attrs, epoch), None


@dataclass(frozen=True)
class Scores:
    """A run's validation mAP and accuracy, as ensemble.json lists them."""

    map: float
    accuracy: float

    def to_json(self) -> dict:
        return {"map": self.map, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, data) -> Scores | None:
        values = [data.get(key) if isinstance(data, dict) else None for key in ("map", "accuracy")]
        return cls(*values) if all(is_number(value) and 0 <= value <= 1 for value in values) else None


@dataclass(frozen=True)
class Fitting:
    """Where an ensemble's weights were fitted: the split, and each member's and the ensemble's scores there."""

    split: str
    member_scores: list[Scores]
    ensemble_scores: Scores


@dataclass(frozen=True)
class EnsembleSpec:
    """ensemble.json: the members (paths relative to the ensemble folder), one weight each (>= 0, summing to 1),
    the classes, and how the weights were fitted (`ensemble` writes it; an ensemble.json made by hand, as the
    README allows, may leave it out)."""

    members: list[str]
    weights: list[float]
    classes: list[str]
    fitting: Fitting | None

    def write(self, folder: Path) -> None:
        fitting = {} if self.fitting is None else {
            "split": self.fitting.split, "member_scores": [scores.to_json() for scores in self.fitting.member_scores],
            "ensemble_scores": self.fitting.ensemble_scores.to_json()}
        write_json(folder / ENSEMBLE_FILE, {"members": self.members, "weights": self.weights, "classes": self.classes,
                                            **fitting})

    @classmethod
    def read(cls, folder: Path) -> EnsembleSpec:
        """The folder's ensemble.json, checked; TrainError naming it."""
        path = folder / ENSEMBLE_FILE
        spec = read_json_object(path) or {}
        members, weights, classes = (spec.get(key) for key in ("members", "weights", "classes"))
        if not (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) and m for m in members)):
            raise TrainError(f"{path}: not an ensemble file (it needs two or more member paths); refit it with"
                             " `python cli.py ensemble`")
        numbers = isinstance(weights, list) and all(is_number(weight) and weight >= 0 for weight in weights)
        if not numbers or len(weights) != len(members) or abs(sum(weights) - 1) > 1e-6:
            raise TrainError(f"{path}: its weights are not one number >= 0 per member summing to 1")
        if not are_distinct_names(classes):
            raise TrainError(f"{path}: its classes are not a list of distinct names")
        return cls(members, weights, classes, fitting_of(spec, len(members)))


def fitting_of(spec: dict, members: int) -> Fitting | None:
    """How ensemble.json says its weights were fitted; None where it does not say so in full."""
    member_scores = spec.get("member_scores")
    if not (isinstance(spec.get("split"), str) and isinstance(member_scores, list) and len(member_scores) == members):
        return None
    scores = [Scores.from_json(each) for each in member_scores]
    ensemble_scores = Scores.from_json(spec.get("ensemble_scores"))
    return None if None in scores or ensemble_scores is None else Fitting(spec["split"], scores, ensemble_scores)


@dataclass(frozen=True)
class LoadedRun:
    """A training run or an ensemble, loaded and checked, its model ready to predict."""

    folder: Path
    name: str  # the model's name (train.config.TRAINABLE_MODELS), or ENSEMBLE_MODEL
    config: TrainConfig | EnsembleSpec
    features: Path  # the feature root it learnt from (an ensemble: its first member's)
    attrs: dict  # the attributes of those features, which other features must be comparable with
    recipe: FeatureRecipe  # how those features were made
    classes: list[str]
    model: nn.Module  # in eval mode, on the device it was loaded to
    metrics: Metrics | None  # on its validation split (an ensemble: the fitting split); None while unfinished


def read_metrics(folder: Path) -> Metrics | None:
    """A run's or an ensemble's metrics.json, the mark that it is finished; None when missing or not metrics."""
    data = read_json_object(folder / COMPLETE_MARK)
    return None if data is None else Metrics.from_json(data)


def load_run(folder: Path, device: torch.device) -> LoadedRun:
    """The run or ensemble in `folder` on `device` (an ensemble is one model over its members)."""
    folder = Path(folder)
    if (folder / ENSEMBLE_FILE).is_file():
        return load_ensemble(folder, device)
    checkpoint = Checkpoint.read(folder / CHECKPOINT, device)
    config = checkpoint.config
    model = model_for(checkpoint.weights, config.model, feature_dims(checkpoint.attrs), len(checkpoint.classes),
                      folder / CHECKPOINT)
    return LoadedRun(folder, config.model, config, config.features, checkpoint.attrs,
                     FeatureRecipe.from_attrs(checkpoint.attrs), checkpoint.classes, model.to(device).eval(),
                     read_metrics(folder))


def model_for(weights: dict[str, torch.Tensor], name: str, dims: dict[str, int], num_classes: int,
              path: Path) -> nn.Module:
    """`name` built for these feature sizes (`feature_dims`) with `weights` loaded, once they are known to fit.

    The model is first described on the meta device (no memory), so sizes a file merely
    claims never allocate anything: only weights of the shapes the file itself holds are.
    """
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_model(name, num_classes=num_classes, **dims).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in weights.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        sizes = " and ".join(f"{key} {value}" for key, value in dims.items())
        raise TrainError(f"{path}: its weights do not fit a {name} model with {sizes} and {num_classes} classes"
                         f" (first difference: {wrong[0]}); retrain the run")
    model = build_model(name, num_classes=num_classes, **dims)
    model.load_state_dict(weights)
    return model


def load_ensemble(folder: Path, device: torch.device) -> LoadedRun:
    """An ensemble folder as one run. Members must be training runs (not ensembles: so no cycle can arise) at
    relative paths from the folder, each loaded like any run, with the ensemble's classes and comparable
    features."""
    spec = EnsembleSpec.read(folder)
    members = [load_run(member_folder(folder, member), device) for member in spec.members]
    first = members[0]
    for member in members:
        if member.classes != spec.classes:
            raise TrainError(f"{folder / ENSEMBLE_FILE}: member {member.folder} predicts other classes than the"
                             " ensemble")
        check_comparable(first.attrs, member.attrs, f"the features of member {member.folder}")
    model = WeightedEnsemble([member.model for member in members], spec.weights).to(device).eval()
    return LoadedRun(folder, ENSEMBLE_MODEL, spec, first.features, first.attrs, first.recipe, spec.classes, model,
                     read_metrics(folder))


def member_folder(folder: Path, member: str) -> Path:
    """The run folder an ensemble member names: a relative path to a training run other than the ensemble."""
    if Path(member).is_absolute() or "\0" in member:
        raise TrainError(f"{folder / ENSEMBLE_FILE}: member {member!r} is not a path relative to the ensemble folder")
    run = folder / member
    if not run.is_dir():
        raise TrainError(f"{folder / ENSEMBLE_FILE}: member {member!r} is not a folder ({run})")
    if (run / ENSEMBLE_FILE).exists():
        what = "the ensemble itself" if run.resolve() == folder.resolve() else "an ensemble"
        raise TrainError(f"{folder / ENSEMBLE_FILE}: member {member!r} is {what}; members are training runs")
    return run


def relative_member(run: Path, folder: Path) -> str:
    """How ensemble.json names the member `run` of the ensemble in `folder`."""
    return os.path.relpath(Path(run).resolve(), Path(folder).resolve())
