"""Scoring: a model's class probabilities over a split, the challenge's metrics, and `evaluate`'s files.

Validation in the training loop, `evaluate`, an ensemble's fitting and compare's Table II all
score through here, in float32 whatever a run was trained in, so a run's scores are its
checkpoint's anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from devices import resolve_device
from outputs import write_json
from train.config import EVAL_BATCH_SIZE, UNLABELLED, TrainError
from train.data import ClipDataset, check_comparable, make_loader, model_inputs, open_split
from train.layout import CONFUSION_FILE, METRICS_FILE, PREDICTIONS_FILE, evaluation_folder
from train.metrics import Metrics, compute_metrics, plot_confusion, write_predictions
from train.runs import LoadedRun, load_run


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Clip ids, labels and class probabilities of every clip the loader yields."""
    model.eval()
    ids, labels, probabilities = [], [], []
    for batch in loader:
        logits = model(*model_inputs(model, batch, device))
        ids += batch["clip_id"]
        labels.append(batch["label"].numpy())
        probabilities.append(logits.softmax(dim=-1).float().cpu().numpy())
    return ids, np.concatenate(labels), np.concatenate(probabilities)


def labelled_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> Metrics:
    known = labels != UNLABELLED
    return compute_metrics(labels[known], probabilities[known], classes)


def split_probabilities(run: LoadedRun, split: str, features: Path | None, device: torch.device,
                        batch_size: int = EVAL_BATCH_SIZE) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A loaded run's clip ids, labels and probabilities on `split` (of `features`, else the run's own feature
    root), once those features are known to be made as the run's were."""
    root = Path(features or run.features)
    feature_set = open_split(root, split)
    check_comparable(run.attrs, feature_set.attrs, f"the {split} features in {root}")
    dataset = ClipDataset(feature_set, run.classes, train=False, inputs=run.model.inputs)
    return predict(run.model, make_loader(dataset, batch_size, 0, 0, shuffle=False), device)


def evaluate_run(folder: Path, split: str, features: Path | None = None, device: str | None = None,
                 batch_size: int = EVAL_BATCH_SIZE) -> Metrics | None:
    """Score the run (or ensemble) in `folder` on `split`; writes FOLDER/eval-SPLIT/. Returns None when the split
    has no labels."""
    torch_device = resolve_device(device)
    run = load_run(folder, torch_device)
    ids, labels, probabilities = split_probabilities(run, split, features, torch_device, batch_size)
    out = evaluation_folder(folder, split)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise TrainError(f"{out} is not a folder of the run (a link or a file): remove it to evaluate {split}")
    out.mkdir(exist_ok=True)
    write_predictions(out / PREDICTIONS_FILE, ids, labels, probabilities, run.classes)
    if (labels == UNLABELLED).all():
        return None
    metrics = labelled_metrics(labels, probabilities, run.classes)
    write_json(out / METRICS_FILE, {**metrics.to_json(), "split": split, "run": str(folder)})
    title = f"{run.name} on {split}: mAP {metrics.map:.3f}, accuracy {metrics.accuracy:.3f}"
    plot_confusion(np.array(metrics.confusion), run.classes, out / CONFUSION_FILE, title)
    return metrics
