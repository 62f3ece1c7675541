"""Stage 2: train one model on feature shards, keep the best epoch by validation mAP, evaluate runs.

A run folder holds everything needed to trust and reuse it: its settings, the attributes of
the features it learnt from (evaluation refuses features that differ), every epoch's scores,
the best epoch's weights and metrics (train/layout.py names the files). An interrupted run of
the same settings resumes after its latest epoch (train/resume.py).

An ensemble folder (train/ensemble.py) holds ensemble.json instead of config.json, epochs.csv
and best.pt; `load_run` gives it as one model, so it is evaluated and used like a run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from devices import autocast, checked_precision, resolve_device
from errors import UserError
from features.reader import FeatureSet, open_features
from features.schema import MAX_CONTEXT_DIM, are_distinct_names, comparable, is_int
from outputs import check_output_folder, check_plain_name, is_temporary, write_atomically
from train.config import TRAINABLE_MODELS, UNLABELLED, TrainConfig
from train.data import ClipDataset, make_loader, preloaded
from train.layout import (
    CHECKPOINT, COMPLETE_MARK, CONFIG_FILE, CONFUSION_FILE, ENSEMBLE_FILE, EPOCHS_FILE, EVAL_PREFIX, FEATURES_FILE,
    LAST_STATE, METRICS_FILE, PREDICTIONS_FILE, RUN_FILES, evaluation_folder,
)
from train.metrics import Metrics, compute_metrics, plot_confusion, write_predictions
from train.models import WeightedEnsemble, build_model, paper_parameter_count, parameter_counts
from train.resume import Progress, loaded, read_state, restore, save_state

logger = logging.getLogger(__name__)
ENSEMBLE_MODEL = "ensemble"
CHECKPOINT_KEYS = ("model", "config", "classes", "attrs", "epoch")


class TrainError(UserError):
    """A problem with the run's inputs or folders that the user can fix; one line."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def open_split(root: Path, split: str) -> FeatureSet:
    folder = Path(root) / check_plain_name(split, "split")
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


def model_inputs(model: nn.Module, batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What `model(inputs, mask)` takes from a collated batch, on `device`: the arrays it declares, and the mask.

    Inputs keep their dtype on the way (float16 context is half the bytes to copy); each model
    computes in its weights' dtype from there. From page-locked memory the copies run
    asynchronously.
    """
    return ({name: batch[name].to(device, non_blocking=True) for name in model.inputs},
            batch["mask"].to(device, non_blocking=True))


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


class MixedPrecision:
    """How training steps compute: the forward pass and the loss under autocast to `precision`
    (float32: as they are), while the weights, their gradients and Adam's state stay float32;
    for float16 the loss is scaled (GradScaler) so that small gradients do not flush to zero."""

    def __init__(self, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")

    def forward(self):
        return autocast(self.device, self.precision)

    def step(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        optimiser.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimiser)  # skipped when the scaled gradients overflowed; the scale then shrinks
        self.scaler.update()


def training_precision(device: torch.device, precision: str) -> MixedPrecision:
    """`precision` for training on `device`, or TrainError where this toolkit refuses it."""
    if checked_precision(precision) == "float16" and device.type == "cpu":
        # Measured (benchmarks/README.md): 3-8x slower than float32 on a CPU with AVX-512, which
        # converts float16 rather than computing in it.
        raise TrainError("--precision float16 is for GPUs: on the CPU it is several times slower than float32;"
                         " use --precision bfloat16 (CPUs with AVX-512 BF16 or AMX) or float32")
    if precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise TrainError(f"this GPU ({torch.cuda.get_device_name(device)}) does not compute in bfloat16: use"
                         " --precision float16 or float32")
    return MixedPrecision(device, precision)


class TimedLoader:
    """A loader that counts the seconds its consumer spends waiting for each next batch."""

    def __init__(self, loader):
        self.loader, self.waiting = loader, 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            tick = time.perf_counter()
            batch = next(batches, None)
            self.waiting += time.perf_counter() - tick
            if batch is None:
                return
            yield batch


def _train_epoch(model, loader, optimiser, loss_fn, device, bar: tqdm,
                 precision: MixedPrecision) -> tuple[float, float]:
    """One epoch; returns (mean loss, seconds spent waiting for data)."""
    model.train()
    total, count = 0.0, 0
    timed = TimedLoader(loader)
    for batch in timed:
        with precision.forward():
            logits = model(*model_inputs(model, batch, device))
            loss = loss_fn(logits, batch["label"].to(device))
        precision.step(loss, optimiser)
        total += loss.item() * len(batch["label"])
        count += len(batch["label"])
        bar.set_postfix(loss=f"{total / count:.4f}")
        bar.update()
    return total / count, timed.waiting


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def writes_into_run(name: str) -> bool:
    """The names a training run (and `evaluate` of it) writes in its folder."""
    return name in RUN_FILES or name.startswith(EVAL_PREFIX) or is_temporary(name)


def read_json_object(path: Path) -> dict | None:
    """A JSON file holding an object; None when it is missing, unreadable or anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _check_run_folder(folder: Path, config: TrainConfig, overwrite: bool) -> None:
    """A run folder to train into must be new, empty, or an unfinished run of the same settings
    (which resumes, or starts over); with `overwrite`, any folder (the run's own files in it are
    replaced)."""
    check_output_folder(folder, "train", overwrite, writes_into_run)
    if not overwrite:
        if (folder / COMPLETE_MARK).exists():
            raise TrainError(f"{folder} already holds a finished run: choose another --out, or pass --overwrite to"
                             " train it again")
        if (folder / CONFIG_FILE).exists():
            stored = read_json_object(folder / CONFIG_FILE)
            differences = config.differences(stored) if stored is not None else [f"{CONFIG_FILE} unreadable"]
            if differences:
                raise TrainError(f"{folder} holds an unfinished run of other settings ({'; '.join(differences)}):"
                                 " choose another --out, or pass --overwrite to replace it")


def _start_run_folder(folder: Path, resuming: bool) -> None:
    """Create the checked run folder; it is not finished until this training writes its own
    metrics. A run that does not resume starts over from no results."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in (COMPLETE_MARK, EPOCHS_FILE) if resuming else (COMPLETE_MARK, EPOCHS_FILE, CHECKPOINT, LAST_STATE):
        (folder / leftover).unlink(missing_ok=True)


def train_model(config: TrainConfig, progress: bool = True, log: Callable[[str], None] = print,
                overwrite: bool = False) -> Metrics:
    """Train `config.model`; returns the best epoch's validation metrics.

    The run folder must be new, empty or an unfinished run of the same settings, unless
    `overwrite` (see `_check_run_folder`); an unfinished one resumes after its latest epoch
    when its saved state fits, and starts over otherwise.
    """
    device = resolve_device(config.device)
    precision = training_precision(device, config.precision)
    _check_run_folder(config.run_folder, config, overwrite)
    seed_everything(config.seed)
    train_set, val_set = open_split(config.features, config.train_split), open_split(config.features, config.val_split)
    check_comparable(train_set.attrs, val_set.attrs, f"the {config.val_split} features")
    classes = list(train_set.attrs["classes"])
    model = build_model(config.model, context_dim=int(train_set.attrs["context_dim"]), num_classes=len(classes))
    pin = device.type == "cuda" and config.num_workers == 0
    train_data = ClipDataset(train_set, classes, train=True, inputs=model.inputs, pin_memory=pin)
    if all(label == UNLABELLED for label in train_data.labels):
        raise TrainError(f"the {config.train_split} features have no labels to learn from")
    val_data = ClipDataset(val_set, classes, train=False, inputs=model.inputs, pin_memory=pin)
    if all(label == UNLABELLED for label in val_data.labels):
        raise TrainError(f"the {config.val_split} features have no labels: choose a labelled --val-split")
    for data, split in ((train_data, config.train_split), (val_data, config.val_split)):
        data.steps = preloaded(data.features, config.preload, model.inputs, split, log)
    logger.info("device %s, training in %s; %d %s clips and %d %s clips, preloaded: %s / %s", device, config.precision,
                len(train_data), config.train_split, len(val_data), config.val_split, train_data.steps is not None,
                val_data.steps is not None)
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
    state, problem = (None, None) if overwrite else read_state(folder / LAST_STATE, config, model, optimiser,
                                                               precision.scaler)
    if problem:
        log(f"{folder}: not resumed from {LAST_STATE} ({problem}); the run starts over")
    _start_run_folder(folder, resuming=state is not None)
    write_json(folder / CONFIG_FILE, config.to_json())
    write_json(folder / FEATURES_FILE, train_set.attrs)
    reached = Progress(rows=[])
    if state is not None:
        reached = restore(state, model, optimiser, precision.scaler, train_loader.generator)
        log(f"{folder}: resuming after epoch {reached.epoch} of {config.epochs}")
    best = reached.best
    with open(folder / EPOCHS_FILE, "w", newline="") as log_file:
        writer = csv.writer(log_file)
        writer.writerows([["epoch", "train_loss", "val_map", "val_accuracy", "data_seconds", "seconds"], *reached.rows])
        for epoch in range(reached.epoch + 1, config.epochs + 1):
            started = time.perf_counter()
            label = f"{config.model} epoch {epoch}/{config.epochs}"
            with tqdm(total=len(train_loader), desc=label, unit="batch", disable=not progress) as bar:
                loss, waiting = _train_epoch(model, train_loader, optimiser, loss_fn, device, bar, precision)
                # Validation computes in float32 whatever the training precision, as `evaluate` and
                # `predict` do: the weights are float32, so a run's scores are its checkpoint's anywhere.
                validation = TimedLoader(val_loader)
                _, labels, probabilities = predict(model, validation, device)
                waiting += validation.waiting
                metrics = labelled_metrics(labels, probabilities, classes)
                bar.set_postfix(loss=f"{loss:.4f}", val_map=f"{metrics.map:.4f}")
            seconds = time.perf_counter() - started
            row = [str(epoch), f"{loss:.6f}", f"{metrics.map:.6f}", f"{metrics.accuracy:.6f}", f"{waiting:.3f}",
                   f"{seconds:.3f}"]
            writer.writerow(row)
            log_file.flush()
            logger.info("%s epoch %d/%d: loss %.4f, val mAP %.4f, accuracy %.4f; %.1f s (%.1f s waiting for data)",
                        config.model, epoch, config.epochs, loss, metrics.map, metrics.accuracy, seconds, waiting)
            # A small validation set is often ranked perfectly for many epochs: ties go to the better accuracy.
            if best is None or (metrics.map, metrics.accuracy) > (best.map, best.accuracy):
                best = metrics
                checkpoint = {"model": model.state_dict(), "config": config.to_json(), "classes": classes,
                              "attrs": train_set.attrs, "epoch": epoch}
                write_atomically(folder / CHECKPOINT, lambda tmp: torch.save(checkpoint, tmp))
            reached = Progress(epoch, [*reached.rows, row], best, epoch if best is metrics else reached.best_epoch)
            if epoch < config.epochs:
                save_state(folder / LAST_STATE, config, model, optimiser, precision.scaler, train_loader.generator,
                           reached)
    write_json(folder / COMPLETE_MARK, {**best.to_json(), "split": config.val_split})
    (folder / LAST_STATE).unlink(missing_ok=True)
    return best


def load_run(run: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The run's model in eval mode on `device`, and its checkpoint ("config", "classes", "attrs", ...).

    Nothing in a run folder is trusted: the checkpoint is loaded without running code (tensors
    and plain values only), its metadata checked, and its weights must fit the model it names
    before that model is built.
    """
    run = Path(run)
    if (run / ENSEMBLE_FILE).is_file():
        return load_ensemble(run, device)
    checkpoint = read_checkpoint(run / CHECKPOINT, device)
    config = checkpoint["config"]
    model = model_for(checkpoint["model"], config["model"], checkpoint["attrs"]["context_dim"],
                      len(checkpoint["classes"]), run / CHECKPOINT)
    return model.to(device).eval(), checkpoint


def read_checkpoint(path: Path, device: torch.device) -> dict:
    """A training checkpoint's contents, loaded with torch's weights-only unpickler (it refuses
    any object but tensors and plain values, so loading never runs code), then checked."""
    if not path.is_file():
        raise TrainError(f"{path.parent} has no {CHECKPOINT}: is it a finished training run?")
    checkpoint, problem = loaded(path, device)
    problem = problem or checkpoint_problem(checkpoint)
    if problem:
        raise TrainError(f"{path}: {problem}; retrain the run")
    return checkpoint


def checkpoint_problem(checkpoint) -> str | None:
    """What makes `checkpoint` something other than a training checkpoint of this toolkit."""
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in CHECKPOINT_KEYS):
        return f"not a training checkpoint (it needs {', '.join(CHECKPOINT_KEYS)})"
    config, classes, attrs, weights = (checkpoint[key] for key in ("config", "classes", "attrs", "model"))
    if not isinstance(config, dict) or config.get("model") not in TRAINABLE_MODELS:
        return f"names no model of this toolkit (one of {', '.join(TRAINABLE_MODELS)})"
    if not isinstance(config.get("features"), str):
        return "its config has no features root"
    if not (are_distinct_names(classes) and len(classes) >= 2):
        return "its classes are not a list of two or more distinct names"
    dim = attrs.get("context_dim") if isinstance(attrs, dict) else None
    if not (is_int(dim) and 1 <= dim <= MAX_CONTEXT_DIM):
        return f"its feature attributes give no context_dim between 1 and {MAX_CONTEXT_DIM}"
    if not isinstance(weights, dict) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()
    ):
        return "its model weights are not a table of named tensors"
    return None


def model_for(weights: dict[str, torch.Tensor], name: str, context_dim: int, num_classes: int, path: Path) -> nn.Module:
    """`name` built for these sizes with `weights` loaded, once they are known to fit.

    The model is first described on the meta device (no memory), so sizes a file merely
    claims never allocate anything: only weights of the shapes the file itself holds are.
    """
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in build_model(name, context_dim, num_classes).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in weights.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise TrainError(f"{path}: its weights do not fit a {name} model with context_dim {context_dim} and"
                         f" {num_classes} classes (first difference: {wrong[0]}); retrain the run")
    model = build_model(name, context_dim, num_classes)
    model.load_state_dict(weights)
    return model


def load_ensemble(folder: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """An ensemble folder as one model, with a checkpoint-like dict (features: the first member's root).

    Members must be training runs (not ensembles: so no cycle can arise) at relative paths
    from the folder, each loaded like any run, with the ensemble's classes and comparable
    features.
    """
    spec = read_ensemble_spec(folder)
    runs = [member_folder(folder, member) for member in spec["members"]]
    members = [load_run(run, device) for run in runs]
    for run, (_, checkpoint) in zip(runs, members):
        if checkpoint["classes"] != spec["classes"]:
            raise TrainError(f"{folder / ENSEMBLE_FILE}: member {run} predicts other classes than the ensemble")
        check_comparable(members[0][1]["attrs"], checkpoint["attrs"], f"the features of member {run}")
    model = WeightedEnsemble([model for model, _ in members], spec["weights"]).to(device).eval()
    first = members[0][1]
    config = {"model": ENSEMBLE_MODEL, "features": first["config"]["features"], "members": spec["members"]}
    return model, {"config": config, "classes": spec["classes"], "attrs": first["attrs"]}


def read_ensemble_spec(folder: Path) -> dict:
    """ensemble.json, checked: two or more member paths, as many weights (finite, >= 0, summing to 1), classes."""
    path = folder / ENSEMBLE_FILE
    spec = read_json_object(path)
    members, weights, classes = (spec.get(key) if spec else None for key in ("members", "weights", "classes"))
    if not (isinstance(members, list) and len(members) >= 2 and all(isinstance(m, str) and m for m in members)):
        raise TrainError(f"{path}: not an ensemble file (it needs two or more member paths); refit it with"
                         " `python cli.py ensemble`")
    numbers = isinstance(weights, list) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
    )
    if not numbers or len(weights) != len(members) or abs(sum(weights) - 1) > 1e-6:
        raise TrainError(f"{path}: its weights are not one number >= 0 per member summing to 1")
    if not (isinstance(classes, list) and all(isinstance(name, str) for name in classes)):
        raise TrainError(f"{path}: its classes are not a list of names")
    return spec


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
    out = evaluation_folder(run, split)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise TrainError(f"{out} is not a folder of the run (a link or a file): remove it to evaluate {split}")
    out.mkdir(exist_ok=True)
    write_predictions(out / PREDICTIONS_FILE, ids, labels, probabilities, classes)
    if (labels == UNLABELLED).all():
        return None
    metrics = labelled_metrics(labels, probabilities, classes)
    write_json(out / METRICS_FILE, {**metrics.to_json(), "split": split, "run": str(run)})
    title = f"{checkpoint['config']['model']} on {split}: mAP {metrics.map:.3f}, accuracy {metrics.accuracy:.3f}"
    plot_confusion(np.array(metrics.confusion), classes, out / CONFUSION_FILE, title)
    return metrics
