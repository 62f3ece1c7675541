"""Stage 2's training loop: train one model on feature shards, keep the best epoch by validation mAP.

A run folder holds everything needed to trust and reuse it: its settings, the attributes of
the features it learnt from (evaluation refuses features that differ), every epoch's scores,
the best epoch's weights and metrics (train/layout.py names the files; train/runs.py reads a
finished run back). An interrupted run of the same settings resumes after its latest epoch
(train/resume.py).
"""

from __future__ import annotations

import csv
import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from devices import autocast, checked_precision, resolve_device
from outputs import check_output_folder, is_temporary, read_json_object, write_json
from train.config import UNLABELLED, TrainConfig, TrainError
from train.data import ClipDataset, check_comparable, check_inputs_held, make_loader, model_inputs, open_split
from train.evaluation import labelled_metrics, predict
from train.layout import (
    CHECKPOINT, COMPLETE_MARK, CONFIG_FILE, EPOCHS_FILE, EVAL_PREFIX, FEATURES_FILE, LAST_STATE, RUN_FILES,
)
from train.metrics import Metrics
from train.models import build_model, feature_dims, paper_parameter_count, parameter_counts
from train.packed import preloaded
from train.resume import Progress, read_state, restore, save_state
from train.runs import Checkpoint

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, N / (C_present * n_c), so rare classes (worried, anxious) count more."""
    counts = np.bincount([label for label in labels if label != UNLABELLED], minlength=num_classes)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


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


def writes_into_run(name: str) -> bool:
    """The names a training run (and `evaluate` of it) writes in its folder."""
    return name in RUN_FILES or name.startswith(EVAL_PREFIX) or is_temporary(name)


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
            differences = stored_differences(folder, config)
            if differences:
                raise TrainError(f"{folder} holds an unfinished run of other settings (there != here: {'; '.join(differences)}):"
                                 " choose another --out, or pass --overwrite to replace it")


def stored_differences(folder: Path, config: TrainConfig) -> list[str]:
    """How the settings of the run in `folder` (its config.json) differ from `config` ("key: there != here")."""
    try:
        return config.differences(TrainConfig.from_json(read_json_object(folder / CONFIG_FILE)))
    except ValueError as exc:
        return [f"{CONFIG_FILE} unreadable ({exc})"]


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
    model = build_model(config.model, num_classes=len(classes), **feature_dims(train_set.attrs))
    check_inputs_held(train_set.attrs, model.inputs, config.model, Path(config.features) / config.train_split)
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
                Checkpoint(model.state_dict(), config, classes, train_set.attrs, epoch).save(folder / CHECKPOINT)
            reached = Progress(epoch, [*reached.rows, row], best, epoch if best is metrics else reached.best_epoch)
            if epoch < config.epochs:
                save_state(folder / LAST_STATE, config, model, optimiser, precision.scaler, train_loader.generator,
                           reached)
    write_json(folder / COMPLETE_MARK, {**best.to_json(), "split": config.val_split})
    (folder / LAST_STATE).unlink(missing_ok=True)
    return best
