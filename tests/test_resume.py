"""An interrupted training run resumes after its latest epoch (train/resume.py): bit for bit the
run that was never interrupted, and only from a saved state that fits; anything else starts over."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.cli_runs import run_cli
from tests.feature_files import write_planted_set
from train import loop
from train.config import AUDIO_MODELS, TRAINABLE_MODELS, TrainConfig
from train.layout import CHECKPOINT, COMPLETE_MARK, EPOCHS_FILE, LAST_STATE
from train.loop import train_model
from tests.conftest import QUIET

EPOCHS = 4
STOP_AFTER = 2  # epochs finished before the interruption


@pytest.fixture(scope="module")
def signal(tmp_path_factory) -> Path:
    return write_planted_set(tmp_path_factory.mktemp("resume"), "both", {"train": 96, "val": 48}, seed=3)


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> Path:
    """A set with the voice, for the models that hear."""
    return write_planted_set(tmp_path_factory.mktemp("resume-voice"), "voice", {"train": 96, "val": 48}, seed=3)


def config_for(signal: Path, out: Path, model: str = "caca") -> TrainConfig:
    return TrainConfig(model=model, features=signal, out=out, epochs=EPOCHS, lr=1e-3, batch_size=16, seed=5,
                       device="cpu")


def interrupted(config: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `config` until Ctrl-C arrives during epoch STOP_AFTER + 1."""
    real, calls = loop._train_epoch, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) > STOP_AFTER:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_epoch", stopping)
        with pytest.raises(KeyboardInterrupt):
            train_model(config, **QUIET)


def scores(folder: Path) -> list[list[str]]:
    """epochs.csv without its timings."""
    return [line.split(",")[:4] for line in (folder / EPOCHS_FILE).read_text().splitlines()]


def weights(folder: Path) -> dict:
    return torch.load(folder / CHECKPOINT, weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(signal, tmp_path_factory) -> Path:
    config = config_for(signal, tmp_path_factory.mktemp("runs") / "whole")
    train_model(config, **QUIET)
    return config.run_folder


@pytest.fixture(scope="module")
def stopped(signal, tmp_path_factory) -> Path:
    """A run folder left by an interruption after STOP_AFTER epochs, never changed (copy it)."""
    config = config_for(signal, tmp_path_factory.mktemp("runs") / "stopped")
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupted(config, monkeypatch)
    return config.run_folder


def test_an_interrupted_run_resumes_after_its_latest_epoch_bit_for_bit(signal, uninterrupted, stopped, tmp_path):
    folder = shutil.copytree(stopped, tmp_path / "run")
    assert (folder / LAST_STATE).is_file() and not (folder / COMPLETE_MARK).exists()
    assert len(scores(folder)) == 1 + STOP_AFTER
    said = []
    train_model(dataclasses.replace(config_for(signal, folder)), progress=False, log=said.append)
    assert f"{folder}: resuming after epoch {STOP_AFTER} of {EPOCHS}" in said
    assert scores(folder) == scores(uninterrupted) and len(scores(folder)) == 1 + EPOCHS
    resumed, whole = weights(folder), weights(uninterrupted)
    assert resumed["epoch"] == whole["epoch"]
    assert all(torch.equal(resumed["model"][name], whole["model"][name]) for name in whole["model"])
    assert json.loads((folder / COMPLETE_MARK).read_text()) == json.loads((uninterrupted / COMPLETE_MARK).read_text())
    assert not (folder / LAST_STATE).exists() and not (uninterrupted / LAST_STATE).exists(), "a finished run keeps none"


@pytest.mark.parametrize("model", [name for name in TRAINABLE_MODELS if name != "caca"])
def test_every_other_model_resumes_bit_for_bit(signal, voice, tmp_path, model, monkeypatch):
    """Their own state included: c3d's batch-norm statistics, each stream's encoder."""
    features = voice if model in AUDIO_MODELS else signal
    whole, cut = (config_for(features, tmp_path / name, model) for name in ("whole", "cut"))
    train_model(whole, **QUIET)
    interrupted(cut, monkeypatch)
    said = []
    train_model(cut, progress=False, log=said.append)
    assert f"{cut.run_folder}: resuming after epoch {STOP_AFTER} of {EPOCHS}" in said
    assert scores(cut.run_folder) == scores(whole.run_folder)
    resumed, uninterrupted_weights = weights(cut.run_folder)["model"], weights(whole.run_folder)["model"]
    assert all(torch.equal(resumed[name], uninterrupted_weights[name]) for name in uninterrupted_weights)


def test_the_cli_resumes_and_says_so(signal, uninterrupted, stopped, tmp_path):
    folder = shutil.copytree(stopped, tmp_path / "run")
    status, stdout, stderr = run_cli("train", "--model", "caca", "--features", signal, "--out", folder, "--epochs",
                                     EPOCHS, "--lr", 1e-3, "--batch-size", 16, "--seed", 5, "--device", "cpu")
    assert status == 0, stderr
    assert f"{folder}: resuming after epoch {STOP_AFTER} of {EPOCHS}" in stdout + stderr
    assert scores(folder) == scores(uninterrupted)


class WouldRunCode:
    """Unpickling this would create a file: loading a state must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def crafted(folder: Path, change) -> None:
    state = torch.load(folder / LAST_STATE, weights_only=True)
    change(state)
    torch.save(state, folder / LAST_STATE)


def wrong_shape(state: dict) -> None:
    name = next(iter(state["model"]))
    state["model"][name] = torch.zeros(3, 3)


DAMAGES = {
    "truncated": lambda folder: (folder / LAST_STATE).write_bytes((folder / LAST_STATE).read_bytes()[:1000]),
    "code to run": lambda folder: torch.save({"model": WouldRunCode(folder / "ran")}, folder / LAST_STATE),
    "weights of another shape": lambda folder: crafted(folder, wrong_shape),
    "an epoch past the run's": lambda folder: crafted(folder, lambda state: state.update(epoch=EPOCHS)),
    "Adam's moments of another shape": lambda folder: crafted(
        folder, lambda state: state["optimiser"]["state"][0].update(exp_avg=torch.zeros(2))),
    "generator states that are not": lambda folder: crafted(
        folder, lambda state: state["rng"].update(torch=torch.zeros(4, dtype=torch.uint8))),
    "rows missing": lambda folder: crafted(folder, lambda state: state["rows"].pop()),
    # Tensors where plain values belong: comparing or writing them would fail mid-run.
    "a tensor among the settings": lambda folder: crafted(folder, lambda state: state["config"].update(lr=torch.ones(3))),
    "a tensor among Adam's settings": lambda folder: crafted(
        folder, lambda state: state["optimiser"]["param_groups"][0].update(lr=torch.ones(3))),
    "a tensor among the best metrics": lambda folder: crafted(
        folder, lambda state: state["best"].update(per_class_ap=torch.ones(3))),
    # Stopped after a better epoch's best.pt was written and before its state was.
    "a best.pt of an epoch it does not know": lambda folder: torch.save(
        {**weights(folder), "epoch": STOP_AFTER + 1}, folder / CHECKPOINT),
    "no best.pt": lambda folder: (folder / CHECKPOINT).unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_state_that_does_not_fit_is_said_and_the_run_starts_over(signal, uninterrupted, stopped, tmp_path, damage):
    folder = shutil.copytree(stopped, tmp_path / "run")
    DAMAGES[damage](folder)
    said = []
    train_model(config_for(signal, folder), progress=False, log=said.append)
    refusals = [line for line in said if "not resumed" in line]
    assert len(refusals) == 1 and refusals[0].startswith(f"{folder}: not resumed from {LAST_STATE} (")
    assert refusals[0].endswith("); the run starts over")
    assert not any("resuming" in line for line in said)
    assert not (folder / "ran").exists(), "loading ran code"
    assert scores(folder) == scores(uninterrupted), "started over: the run a fresh folder gives"
    assert not (folder / LAST_STATE).exists()


def test_a_state_of_other_settings_is_never_used(signal, stopped, tmp_path):
    """Only with --overwrite can a run of other settings be trained there; it then starts over."""
    folder = shutil.copytree(stopped, tmp_path / "run")
    other = dataclasses.replace(config_for(signal, folder), lr=1e-2)
    said = []
    train_model(other, progress=False, log=said.append, overwrite=True)
    assert not any("resum" in line for line in said)
    assert [row[0] for row in scores(folder)] == ["epoch", *map(str, range(1, EPOCHS + 1))]
