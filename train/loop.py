"""Stage 2: train one model on feature shards, keep the best epoch by validation mAP, evaluate runs.

A run folder holds everything needed to trust and reuse it:
  config.json         the training settings
  features.json       the training features' attributes (evaluation refuses features that differ)
  epochs.csv          per epoch: train loss, validation loss, mAP and accuracy, seconds (data, total)
  best.pt             the model of the epoch with the best validation mAP, with its config
  metrics.json        the best epoch's validation metrics (written last: a run is complete with it)
  eval-SPLIT/         from `evaluate`: metrics.json, confusion.png, predictions.csv

An ensemble folder (train/ensemble.py) holds ensemble.json instead of config.json, epochs.csv
and best.pt; `load_run` gives it as one model, so it is evaluated and used like a run.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from devices import resolve_device
from features import open_features
from features.reader import FeatureSet
from features.schema import comparable
from train.config import TrainConfig
from train.data import STEP_INPUTS, UNLABELLED, ClipDataset, make_loader, should_preload
from train.metrics import Metrics, compute_metrics, plot_confusion, write_atomically, write_predictions
from train.models import WeightedEnsemble, build_model, paper_parameter_count, parameter_counts

logger = logging.getLogger(__name__)
COMPLETE_MARK = "metrics.json"
ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_MODEL = "ensemble"


class TrainError(Exception):
    """A problem with the run's inputs or folders that the user can fix; one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_split(root: Path, split: str) -> FeatureSet:
    folder = Path(root) / split
    if not folder.is_dir():
        raise TrainError(f"no features for split '{split}' in {root}: run `python cli.py extract --split {split}` first")
    return open_features(folder)


def check_comparable(reference: dict, other: dict, what: str) -> None:
    differences = comparable(reference, other)
    if differences:
        raise TrainError(f"{what} were made with other settings ({'; '.join(differences)})")


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, N / (C_present * n_c), so rare classes (worried, anxious) count more."""
    counts = np.bincount([label for label in labels if label != UNLABELLED], minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def model_inputs(batch: dict, device: torch.device) -> tuple:
    """(face, context, mask, face_map) of a collated batch on `device`; None for the inputs the batch lacks."""
    face, context, face_map = (batch[name].to(device) if name in batch else None for name in STEP_INPUTS)
    return face, context, batch["mask"].to(device), face_map


@torch.inference_mode()
def predict(model: nn.Module, loader, device: torch.device) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Clip ids, labels and class probabilities of every clip the loader yields."""
    model.eval()
    ids, labels, probabilities = [], [], []
    for batch in loader:
        logits = model(*model_inputs(batch, device))
        ids += batch["clip_id"]
        labels.append(batch["label"].numpy())
        probabilities.append(logits.softmax(dim=-1).float().cpu().numpy())
    return ids, np.concatenate(labels), np.concatenate(probabilities)


def labelled_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> Metrics:
    known = labels != UNLABELLED
    return compute_metrics(labels[known], probabilities[known], classes)


def _train_epoch(model, loader, optimiser, loss_fn, device, bar: tqdm) -> tuple[float, float]:
    """One epoch; returns (mean loss, seconds spent waiting for data)."""
    model.train()
    total, count, waiting = 0.0, 0, 0.0
    tick = time.perf_counter()
    for batch in loader:
        waiting += time.perf_counter() - tick
        logits = model(*model_inputs(batch, device))
        loss = loss_fn(logits, batch["label"].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(batch["label"])
        count += len(batch["label"])
        bar.set_postfix(loss=f"{total / count:.4f}")
        bar.update()
        tick = time.perf_counter()
    return total / count, waiting


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def _prepare_run_folder(folder: Path) -> None:
    if (folder / COMPLETE_MARK).exists():
        raise TrainError(f"{folder} already holds a finished run; choose another --out or delete it")
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in ("epochs.csv", "best.pt"):
        (folder / leftover).unlink(missing_ok=True)  # an interrupted run starts over


def train_model(config: TrainConfig, progress: bool = True, log: Callable[[str], None] = print) -> Metrics:
    """Train `config.model`; returns the best epoch's validation metrics."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    train_set, val_set = open_split(config.features, config.train_split), open_split(config.features, config.val_split)
    check_comparable(train_set.attrs, val_set.attrs, f"the {config.val_split} features")
    classes = list(train_set.attrs["classes"])
    model = build_model(config.model, context_dim=int(train_set.attrs["context_dim"]), num_classes=len(classes))
    train_data = ClipDataset(train_set, classes, train=True, inputs=model.inputs,
                             preload=should_preload(train_set, config.preload, model.inputs))
    if all(label == UNLABELLED for label in train_data.labels):
        raise TrainError(f"the {config.train_split} features have no labels to learn from")
    val_data = ClipDataset(val_set, classes, train=False, inputs=model.inputs,
                           preload=should_preload(val_set, config.preload, model.inputs))
    if all(label == UNLABELLED for label in val_data.labels):
        raise TrainError(f"the {config.val_split} features have no labels: choose a labelled --val-split")
    logger.info("device %s; %d %s clips and %d %s clips, preloaded: %s / %s", device, len(train_data),
                config.train_split, len(val_data), config.val_split, train_data.cache is not None, val_data.cache is not None)
    train_loader = make_loader(train_data, config.batch_size, config.num_workers, config.seed, shuffle=True)
    val_loader = make_loader(val_data, config.batch_size, config.num_workers, config.seed, shuffle=False)

    total, core = parameter_counts(model)
    log(f"{config.model}: {total / 1e6:.2f}M parameters, {core / 1e6:.2f}M without the stream encoders"
        f" (the paper's Table I: {paper_parameter_count(config.model)}; see train/models.py on the difference)")
    model.to(device)
    weight = class_weights(train_data.labels, len(classes)).to(device) if config.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)

    folder = config.run_folder
    _prepare_run_folder(folder)
    write_json(folder / "config.json", config.to_json())
    write_json(folder / "features.json", train_set.attrs)
    best: Metrics | None = None
    with open(folder / "epochs.csv", "w", newline="") as log_file:
        writer = csv.writer(log_file)
        writer.writerow(["epoch", "train_loss", "val_map", "val_accuracy", "data_seconds", "seconds"])
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            label = f"{config.model} epoch {epoch}/{config.epochs}"
            with tqdm(total=len(train_loader), desc=label, unit="batch", disable=not progress) as bar:
                loss, waiting = _train_epoch(model, train_loader, optimiser, loss_fn, device, bar)
                _, labels, probabilities = predict(model, val_loader, device)
                metrics = labelled_metrics(labels, probabilities, classes)
                bar.set_postfix(loss=f"{loss:.4f}", val_map=f"{metrics.map:.4f}")
            seconds = time.perf_counter() - started
            writer.writerow([epoch, f"{loss:.6f}", f"{metrics.map:.6f}", f"{metrics.accuracy:.6f}",
                             f"{waiting:.3f}", f"{seconds:.3f}"])
            log_file.flush()
            logger.info("%s epoch %d/%d: loss %.4f, val mAP %.4f, accuracy %.4f; %.1f s (%.1f s waiting for data)",
                        config.model, epoch, config.epochs, loss, metrics.map, metrics.accuracy, seconds, waiting)
            # A small validation set is often ranked perfectly for many epochs: ties go to the better accuracy.
            if best is None or (metrics.map, metrics.accuracy) > (best.map, best.accuracy):
                best = metrics
                torch.save(
                    {"model": model.state_dict(), "config": config.to_json(), "classes": classes,
                     "attrs": train_set.attrs, "epoch": epoch},
                    folder / "best.pt",
                )
    write_json(folder / COMPLETE_MARK, {**best.to_json(), "split": config.val_split})
    return best


def load_run(run: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The run's model in eval mode on `device`, and its checkpoint ("config", "classes", "attrs", ...)."""
    if (Path(run) / ENSEMBLE_FILE).is_file():
        return load_ensemble(Path(run), device)
    checkpoint_path = Path(run) / "best.pt"
    if not checkpoint_path.is_file():
        raise TrainError(f"{run} has no best.pt: is it a finished training run?")
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
    config = checkpoint["config"]
    model = build_model(config["model"], context_dim=int(checkpoint["attrs"]["context_dim"]),
                        num_classes=len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


def load_ensemble(folder: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """An ensemble folder as one model, with a checkpoint-like dict (features: the first member's root)."""
    spec = json.loads((folder / ENSEMBLE_FILE).read_text())
    members = [load_run(folder / member, device) for member in spec["members"]]
    model = WeightedEnsemble([model for model, _ in members], spec["weights"]).to(device).eval()
    first = members[0][1]
    config = {"model": ENSEMBLE_MODEL, "features": first["config"]["features"], "members": spec["members"]}
    return model, {"config": config, "classes": spec["classes"], "attrs": first["attrs"]}


def split_probabilities(
    model: nn.Module, checkpoint: dict, split: str, features: Path | None, device: torch.device, batch_size: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A loaded run's clip ids, labels and probabilities on `split`, once its features match the run's."""
    root = Path(features or checkpoint["config"]["features"])
    feature_set = open_split(root, split)
    check_comparable(checkpoint["attrs"], feature_set.attrs, f"the {split} features in {root}")
    dataset = ClipDataset(feature_set, checkpoint["classes"], train=False, inputs=model.inputs)
    return predict(model, make_loader(dataset, batch_size, 0, 0, shuffle=False), device)


def evaluate_run(
    run: Path, split: str, features: Path | None = None, device: str | None = None, batch_size: int = 64
) -> Metrics | None:
    """Score `run` on `split`; writes RUN/eval-SPLIT/. Returns None when the split has no labels."""
    torch_device = resolve_device(device)
    model, checkpoint = load_run(run, torch_device)
    classes = checkpoint["classes"]
    ids, labels, probabilities = split_probabilities(model, checkpoint, split, features, torch_device, batch_size)
    out = Path(run) / f"eval-{split}"
    out.mkdir(exist_ok=True)
    write_predictions(out / "predictions.csv", ids, labels, probabilities, classes)
    if (labels == UNLABELLED).all():
        return None
    metrics = labelled_metrics(labels, probabilities, classes)
    write_json(out / "metrics.json", {**metrics.to_json(), "split": split, "run": str(run)})
    title = f"{checkpoint['config']['model']} on {split}: mAP {metrics.map:.3f}, accuracy {metrics.accuracy:.3f}"
    plot_confusion(np.array(metrics.confusion), classes, out / "confusion.png", title)
    return metrics
