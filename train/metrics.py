"""Scoring clip predictions: average precision, accuracy, the confusion matrix, and their files.

`average_precision` is scikit-learn's `average_precision_score` for one class against the rest
(non-interpolated, one threshold per distinct score, so tied clips count together), written
with numpy alone so scikit-learn stays a test dependency. `mean_average_precision` is the macro
mean over the classes that occur in the labels: a class with no positive clip has no defined
AP, and counting it as 0 would punish a split for what it lacks.

Labels are class indices into the `classes` list the caller passes (feature files carry their
own). Inputs that cannot be scored (unlabelled clips, shapes that disagree, scores that are not
finite) raise `ValueError` rather than produce a number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from manifests.spreadsheet import neutralised
from outputs import write_atomically
from train.config import UNLABELLED
from values import are_distinct_names, is_int, is_number

PROBABILITY_PREFIX = "p_"


def average_precision(y_true: np.ndarray, scores: np.ndarray, class_index: int) -> float:
    """AP of `class_index` against the rest: the sum over thresholds of (R_n - R_{n-1}) * P_n."""
    y_true, scores = _checked_labels_and_scores(y_true, scores)
    if not 0 <= class_index < scores.shape[1]:
        raise ValueError(f"class_index {class_index} is outside the {scores.shape[1]} score columns")
    is_positive = y_true == class_index
    positives = int(is_positive.sum())
    if positives == 0:
        raise ValueError(f"class {class_index} has no positive example: its average precision is undefined")

    class_scores = scores[:, class_index]
    order = np.argsort(-class_scores, kind="stable")
    ranked_scores = class_scores[order]
    # Clips with equal scores are retrieved together, so each threshold sits at the last clip
    # of a run of equal scores, as in scikit-learn's precision_recall_curve.
    threshold_ends = np.append(np.flatnonzero(np.diff(ranked_scores)), len(ranked_scores) - 1)
    true_positives = np.cumsum(is_positive[order])[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    recall_gain = np.diff(true_positives, prepend=0) / positives
    return float(np.sum(recall_gain * precision))


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, dict[int, float]]:
    """(macro mean AP over the classes present in y_true, {class_index: AP} for those classes)."""
    y_true, scores = _checked_labels_and_scores(y_true, scores)
    per_class = {int(c): average_precision(y_true, scores, int(c)) for c in np.unique(y_true)}
    return float(np.mean(list(per_class.values()))), per_class


def accuracy(y_true: np.ndarray, predicted: np.ndarray) -> float:
    y_true, predicted = _checked_label_pair(y_true, predicted)
    return float(np.mean(y_true == predicted))


def confusion_matrix(y_true: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class): rows are true classes, columns predictions."""
    y_true, predicted = _checked_label_pair(y_true, predicted)
    for name, labels in (("y_true", y_true), ("predicted", predicted)):
        _check_label_range(name, labels, num_classes)
    cells = np.bincount(y_true * num_classes + predicted, minlength=num_classes * num_classes)
    return cells.reshape(num_classes, num_classes)


@dataclass
class Metrics:
    map: float
    accuracy: float
    per_class_ap: dict[str, float]
    confusion: list[list[int]]
    classes: list[str]
    count: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> Metrics | None:
        """The metrics of a metrics.json (whose other keys, such as the split, are left); None when they are not."""
        if not isinstance(data, dict) or any(field.name not in data for field in fields(cls)):
            return None
        values = {field.name: data[field.name] for field in fields(cls)}
        scores = [values["map"], values["accuracy"], *(values["per_class_ap"].values()
                                                       if isinstance(values["per_class_ap"], dict) else [None])]
        confusion = values["confusion"]
        if not (all(is_number(score) and 0 <= score <= 1 for score in scores)
                and all(isinstance(name, str) for name in values["per_class_ap"])
                and are_distinct_names(values["classes"]) and is_int(values["count"]) and values["count"] >= 0
                and isinstance(confusion, list) and all(isinstance(row, list) and all(is_int(n) for n in row)
                                                        for row in confusion)):
            return None
        return cls(**values)


def compute_metrics(y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> Metrics:
    """All figures of one split; the predicted class of a clip is its highest score."""
    y_true, scores = _checked_labels_and_scores(y_true, scores)
    _check_classes(classes, scores.shape[1])
    _check_label_range("y_true", y_true, len(classes))
    predicted = scores.argmax(axis=1)
    mean_ap, per_class = mean_average_precision(y_true, scores)
    return Metrics(
        map=mean_ap,
        accuracy=accuracy(y_true, predicted),
        per_class_ap={classes[c]: ap for c, ap in per_class.items()},
        confusion=confusion_matrix(y_true, predicted, len(classes)).tolist(),
        classes=list(classes),
        count=len(y_true),
    )


def plot_confusion(confusion, classes: Sequence[str], path: Path, title: str) -> Path:
    """A PNG of the confusion matrix: counts in the cells, shading by share of the true class.

    Shading by row share keeps a rare class's errors as visible as a common class's, which raw
    counts would hide on an unbalanced split like CHEAVD 2.0.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    _check_classes(classes, counts.shape[0])
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion has shape {counts.shape}, expected {(len(classes), len(classes))}")
    row_totals = counts.sum(axis=1)
    shares = counts / np.maximum(row_totals, 1)[:, None]

    side = 2.5 + 0.8 * len(classes)
    figure = Figure(figsize=(side + 1.2, side), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    _write_cell_counts(axes, counts, shares)

    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=[f"{name} ({total})" for name, total in zip(classes, row_totals)])
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (clips)")
    axes.set_title(title)

    path = Path(path)
    # A tight bounding box keeps long class names and the axis labels inside the image.
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.2))
    return path


def write_predictions(
    path: Path, clip_ids, y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str]
) -> Path:
    """A CSV of one row per clip: clip_id, true (empty when unlabelled), predicted, p_<class>..."""
    clip_ids = [str(clip_id) for clip_id in clip_ids]
    y_true = np.asarray(y_true)
    scores = _checked_scores(scores, len(clip_ids))
    _check_classes(classes, scores.shape[1])
    if y_true.shape != (len(clip_ids),) or not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(
            f"y_true must be {len(clip_ids)} integer labels, got {y_true.dtype} of shape {y_true.shape}"
        )
    if np.any((y_true < UNLABELLED) | (y_true >= len(classes))):
        raise ValueError(f"y_true must be class indices below {len(classes)}, or {UNLABELLED} for unlabelled clips")

    names = np.asarray(list(classes), dtype=object)
    frame = pd.DataFrame(
        {
            "clip_id": [neutralised(clip_id) for clip_id in clip_ids],
            "true": [neutralised(name) for name in np.where(y_true == UNLABELLED, "", names[np.maximum(y_true, 0)])],
            "predicted": [neutralised(name) for name in names[scores.argmax(axis=1)]],
            **{f"{PROBABILITY_PREFIX}{name}": scores[:, c] for c, name in enumerate(classes)},
        }
    )
    path = Path(path)
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n"))
    return path


def _write_cell_counts(axes, counts: np.ndarray, shares: np.ndarray) -> None:
    for row, column in np.ndindex(counts.shape):
        # White on dark cells, black on light ones, so every count stays legible.
        colour = "white" if shares[row, column] > 0.5 else "black"
        axes.text(column, row, str(counts[row, column]), ha="center", va="center", color=colour, fontsize=10)


def _checked_labels_and_scores(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = _checked_labels("y_true", y_true)
    scores = _checked_scores(scores, len(y_true))
    _check_label_range("y_true", y_true, scores.shape[1])
    return y_true, scores


def _checked_label_pair(y_true: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = _checked_labels("y_true", y_true)
    predicted = _checked_labels("predicted", predicted)
    if len(predicted) != len(y_true):
        raise ValueError(f"{len(y_true)} true labels but {len(predicted)} predictions")
    return y_true, predicted


def _checked_labels(name: str, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be a non-empty 1-D array of integer class indices, got {labels.dtype} of shape {labels.shape}"
        )
    return labels


def _checked_scores(scores: np.ndarray, rows: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != rows or scores.shape[1] == 0:
        raise ValueError(f"scores must have shape ({rows}, number of classes), got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    return scores


def _check_label_range(name: str, labels: np.ndarray, num_classes: int) -> None:
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes}), got values from {labels.min()} to {labels.max()}"
            " (unlabelled clips cannot be scored)"
        )


def _check_classes(classes: Sequence[str], columns: int) -> None:
    if len(classes) != columns:
        raise ValueError(f"{len(classes)} class names for {columns} score columns")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names repeat: {list(classes)}")
