"""The paper's "CACA-RNN+2D-3D-CNN" (section VI, Table II): trained runs whose class
probabilities are linearly weighted.

Weights: one per member, on the simplex (each in [0, 1], summing to 1), chosen to maximise
the mAP on the fitting split (accuracy breaks ties, then closeness to equal weights, which
over-fits least). With up to MAX_GRID_MEMBERS members every point of the simplex grid of step
WEIGHT_STEP is tried. With more, a coordinate search on that grid: it starts at the best
member alone and keeps moving one step of weight from one member to another while that
scores higher. Both include "the best member alone", so the ensemble never scores below its
best member on the split it was fitted on (it may elsewhere: that is what a test split tells).

An ensemble folder:
  ensemble.json   members (paths relative to this folder), weights, classes, the fitting
                  split, each member's and the ensemble's scores there
  features.json   the members' (comparable) feature attributes
  metrics.json    the ensemble's metrics on the fitting split (written last: it is complete)
ensemble.json is written and read by train/runs.py (`EnsembleSpec`), which loads the folder like a run, so
`evaluate` and `predict` take it as --run.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from devices import resolve_device
from outputs import check_output_folder, is_temporary, same_file, write_json
from train.config import DEFAULT_RUNS, DEFAULT_VAL_SPLIT, UNLABELLED, TrainError
from train.data import check_comparable
from train.evaluation import labelled_metrics, split_probabilities
from train.layout import COMPLETE_MARK, ENSEMBLE_FILE, ENSEMBLE_FILES, EVAL_PREFIX, FEATURES_FILE
from train.metrics import Metrics
from train.runs import EnsembleSpec, Fitting, LoadedRun, Scores, load_run, relative_member

WEIGHT_STEP = 0.05
MAX_GRID_MEMBERS = 3


def default_folder(runs: list[Path]) -> Path:
    return DEFAULT_RUNS / f"ensemble-{'+'.join(Path(run).name for run in runs)}"


def writes_into_ensemble(name: str) -> bool:
    """The names an ensemble (and `evaluate` of it) writes in its folder."""
    return name in ENSEMBLE_FILES or name.startswith(EVAL_PREFIX) or is_temporary(name)


def check_member(member: LoadedRun, first: LoadedRun) -> None:
    """A member must read features made like the first member's and predict the same classes."""
    check_comparable(first.attrs, member.attrs, f"the features of member {member.folder}")
    if member.classes != first.classes:
        raise TrainError(f"member {member.folder} predicts other classes than {first.folder}")


def simplex_grid(members: int) -> list[tuple[float, ...]]:
    """Every weight vector with entries in multiples of WEIGHT_STEP summing to 1."""
    units = round(1 / WEIGHT_STEP)
    return [tuple(c / units for c in (*head, units - sum(head)))
            for head in itertools.product(range(units + 1), repeat=members - 1) if sum(head) <= units]


def coordinate_search(members: int, score, start: int) -> tuple[float, ...]:
    """From member `start` alone, move WEIGHT_STEP between two members while the score rises."""
    units = round(1 / WEIGHT_STEP)
    counts = [units if i == start else 0 for i in range(members)]
    best = score(tuple(c / units for c in counts))
    improved = True
    while improved:
        improved = False
        for give, take in itertools.permutations(range(members), 2):
            if counts[give] == 0:
                continue
            trial = list(counts)
            trial[give] -= 1
            trial[take] += 1
            trial_score = score(tuple(c / units for c in trial))
            if trial_score > best:
                counts, best, improved = trial, trial_score, True
    return tuple(c / units for c in counts)


def fit_weights(labels: np.ndarray, probabilities: list[np.ndarray], classes: list[str]) -> tuple[float, ...]:
    """The weights of the module notes."""
    members = len(probabilities)
    uniform = np.full(members, 1 / members)

    def score(weights: tuple[float, ...]) -> tuple[float, float, float]:
        metrics = labelled_metrics(labels, mixed(probabilities, weights), classes)
        return metrics.map, metrics.accuracy, -float(np.abs(np.array(weights) - uniform).sum())

    if members <= MAX_GRID_MEMBERS:
        return max(simplex_grid(members), key=score)
    alone = [score(tuple(float(i == m) for i in range(members))) for m in range(members)]
    return coordinate_search(members, score, start=max(range(members), key=alone.__getitem__))


def mixed(probabilities: list[np.ndarray], weights) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, probabilities))


def fit_ensemble(runs: list[Path], split: str = DEFAULT_VAL_SPLIT, features: Path | None = None, out: Path | None = None,
                 device: str | None = None, overwrite: bool = False) -> Path:
    """Fit the members' weights on `split`, write the ensemble folder; returns it.

    The folder must be new, empty or an unfinished ensemble, unless `overwrite`; members
    are training runs, never the folder itself.
    """
    if len(runs) < 2:
        raise TrainError("an ensemble needs at least two runs")
    folder = Path(out or default_folder(runs))
    for run in runs:
        if same_file(run, folder):
            raise TrainError(f"--out {folder} is one of the members; choose another folder for the ensemble")
        if (Path(run) / ENSEMBLE_FILE).exists():
            raise TrainError(f"{run} is an ensemble; an ensemble's members are training runs (list them instead)")
    check_output_folder(folder, "ensemble", overwrite, writes_into_ensemble)
    if (folder / COMPLETE_MARK).exists() and not overwrite:
        raise TrainError(f"{folder} already holds a finished ensemble: choose another --out, or pass --overwrite"
                         " to fit it again")
    torch_device = resolve_device(device)
    members = [load_run(Path(run), torch_device) for run in runs]
    for member in members[1:]:
        check_member(member, members[0])
    outputs = [split_probabilities(member, split, features, torch_device) for member in members]
    ids, labels, _ = outputs[0]
    if any(other_ids != ids for other_ids, _, _ in outputs[1:]):
        raise TrainError(f"the members read different clips of '{split}': pass --features to use one feature root")
    if (labels == UNLABELLED).all():
        raise TrainError(f"the {split} features have no labels to fit the weights on: choose a labelled --split")
    probabilities = [p for _, _, p in outputs]
    classes = list(members[0].classes)
    weights = fit_weights(labels, probabilities, classes)
    member_scores = [labelled_metrics(labels, p, classes) for p in probabilities]
    ensemble_scores = labelled_metrics(labels, mixed(probabilities, weights), classes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMPLETE_MARK).unlink(missing_ok=True)  # complete again only once everything below is written
    fitting = Fitting(split, [scores_of(m) for m in member_scores], scores_of(ensemble_scores))
    EnsembleSpec([relative_member(run, folder) for run in runs], list(weights), classes, fitting).write(folder)
    write_json(folder / FEATURES_FILE, members[0].attrs)
    write_json(folder / COMPLETE_MARK, {**ensemble_scores.to_json(), "split": split})
    return folder


def scores_of(metrics: Metrics) -> Scores:
    return Scores(metrics.map, metrics.accuracy)
