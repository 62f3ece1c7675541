"""An unfinished run's state after its latest epoch (last.pt): written after every epoch, checked
before use, restored so that an interrupted run resumes where it stopped.

The state holds the weights, Adam's moments, the loss scaler, the random generators (torch's,
which draws dropout and the random starts, and the training loader's, which draws the order
of clips) and the epochs.csv rows so far. On the CPU with `--num-workers 0` (the default) a
resumed run is bit for bit the run that was never interrupted. Loader workers keep their own
generators for the whole run and draw their seed from the loader's once, when first started:
after a resumption with workers, the order of clips and the random starts differ from the
uninterrupted run's (the run is as valid, not identical).

Like every file of a run folder, last.pt is loaded without running code (tensors and plain
values only) and must fit the model, optimiser and settings it is restored into; a state that
does not is reported in one line and the run starts over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from outputs import write_atomically
from train.config import TrainConfig
from train.layout import CHECKPOINT
from train.metrics import Metrics
from train.runs import Checkpoint, loaded

STATE_KEYS = ("model", "optimiser", "scaler", "epoch", "rows", "best", "best_epoch", "rng", "config")
EPOCH_COLUMNS = 6  # epochs.csv's: epoch, train_loss, val_map, val_accuracy, data_seconds, seconds


@dataclass
class Progress:
    """Where a run stands after an epoch: the epochs.csv rows so far, and the best epoch and its metrics."""

    epoch: int = 0
    rows: list[list[str]] | None = None
    best: Metrics | None = None
    best_epoch: int = 0


def save_state(path: Path, config: TrainConfig, model: nn.Module, optimiser: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, loader_generator: torch.Generator, progress: Progress) -> None:
    """Write the state after `progress.epoch` (whole, then renamed into place)."""
    state = {
        "model": model.state_dict(), "optimiser": optimiser.state_dict(), "scaler": scaler.state_dict(),
        "epoch": progress.epoch, "rows": progress.rows, "best": progress.best.to_json(), "best_epoch": progress.best_epoch,
        "config": config.to_json(),
        "rng": {"torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def read_state(path: Path, config: TrainConfig, model: nn.Module, optimiser: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> tuple[dict | None, str | None]:
    """The state at `path` if it resumes this run: (state, None); (None, None) when there is none;
    (None, why) when it cannot be used."""
    if not path.is_file():
        return None, None
    state, problem = loaded(path)
    problem = f"{path.name} {problem}" if problem else state_problem(state, config, model, optimiser, scaler)
    if problem is None:
        # best.pt is written before last.pt: a run stopped between the two has a best.pt of an
        # epoch the state does not know, which resuming could leave in place of the best one.
        best, problem = Checkpoint.checked(path.parent / CHECKPOINT, "cpu")
        problem = problem and f"{CHECKPOINT}: {problem}"
        if problem is None and best.epoch != state["best_epoch"]:
            problem = f"{CHECKPOINT} is not the checkpoint of the best epoch it saved ({state['best_epoch']})"
    return (None, problem) if problem else (state, None)


def state_problem(state, config: TrainConfig, model: nn.Module, optimiser: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler) -> str | None:
    """What keeps `state` from resuming this run, or None."""
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        return f"not a saved training state (it needs {', '.join(STATE_KEYS)})"
    try:
        stored = TrainConfig.from_json(state["config"])
    except ValueError:
        stored = None
    if stored is None or config.differences(stored):
        return "saved by a run of other settings"
    epoch = state["epoch"]
    if type(epoch) is not int or not 1 <= epoch < config.epochs:
        return f"its epoch is not one of 1 to {config.epochs - 1}"
    if not (isinstance(state["rows"], list) and len(state["rows"]) == epoch and all(
            isinstance(row, list) and len(row) == EPOCH_COLUMNS and all(isinstance(cell, str) for cell in row)
            for row in state["rows"])):
        return f"it does not hold the epochs.csv rows of its {epoch} epoch(s)"
    if Metrics.from_json(state["best"]) is None or type(state["best_epoch"]) is not int or not 1 <= state["best_epoch"] <= epoch:
        return "its best epoch and metrics are not an epoch's metrics"
    return (weights_problem(state["model"], model) or optimiser_problem(state["optimiser"], optimiser)
            or scaler_problem(state["scaler"], scaler) or rng_problem(state["rng"]))


def plain(value) -> bool:
    """Whether `value` is made of plain values only (what JSON holds), so comparing or writing it
    can do nothing unexpected: a crafted file's tensor in their place would."""
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def same_plain(a, b) -> bool:
    return plain(a) and plain(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def weights_problem(weights, model: nn.Module) -> str | None:
    expected = {name: (value.shape, value.dtype) for name, value in model.state_dict().items()}
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        return "its weights are not a table of tensors"
    found = {name: (value.shape, value.dtype) for name, value in weights.items()}
    return None if found == expected else "its weights do not fit the model these settings build"


def optimiser_problem(saved, optimiser: torch.optim.Optimizer) -> str | None:
    """Adam's state must hold, per parameter, moments of that parameter's shape and a scalar step."""
    current = optimiser.state_dict()
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and same_plain(saved.get("param_groups"), current["param_groups"])):
        return "its optimiser state is not Adam's for this model with these settings"
    shapes = dict(enumerate(parameter.shape for group in optimiser.param_groups for parameter in group["params"]))
    for index, moments in saved["state"].items():
        if index not in shapes or not isinstance(moments, dict) or not all(isinstance(v, torch.Tensor) for v in moments.values()):
            return "its optimiser state is not Adam's for this model"
        if any(moments.get(name) is None or moments[name].shape != shapes[index] for name in ("exp_avg", "exp_avg_sq")):
            return "its optimiser state does not fit the model these settings build"
        if moments.get("step") is None or moments["step"].numel() != 1:
            return "its optimiser state does not fit the model these settings build"
    return None


def scaler_problem(saved, scaler: torch.amp.GradScaler) -> str | None:
    """float16 runs scale the loss and save the scaler's numbers; other runs save none."""
    if not isinstance(saved, dict) or set(saved) != set(scaler.state_dict()) or not all(
            isinstance(value, (int, float)) for value in saved.values()):
        return "its loss scaler state is not this run's"
    return None


def rng_problem(saved) -> str | None:
    """torch's CPU generators' states have one size; CUDA's are restored only where they fit."""
    size = torch.get_rng_state().shape
    if not (isinstance(saved, dict) and all(
            isinstance(saved.get(name), torch.Tensor) and saved[name].dtype == torch.uint8 and saved[name].shape == size
            for name in ("torch", "loader")) and isinstance(saved.get("cuda"), list)
            and all(isinstance(value, torch.Tensor) and value.dtype == torch.uint8 for value in saved["cuda"])):
        return "its random generators' states are not generator states"
    return None


def restore(state: dict, model: nn.Module, optimiser: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            loader_generator: torch.Generator) -> Progress:
    """Put a checked state back; the progress it had reached."""
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    loader_generator.set_state(state["rng"]["loader"])
    cuda = state["rng"]["cuda"]
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count() and all(
            saved.shape == torch.cuda.get_rng_state(index).shape for index, saved in enumerate(cuda)):
        torch.cuda.set_rng_state_all(cuda)
    return Progress(state["epoch"], state["rows"], Metrics.from_json(state["best"]), state["best_epoch"])
