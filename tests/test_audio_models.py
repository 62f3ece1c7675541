"""The models that hear (`audio`, `face-audio`, `caca-av`) on a planted voice: who learns what, frames
without audio, refusals of features without it, compare's table and ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from features.reader import open_features
from tests.cli_runs import one_line_error, run_cli
from tests.compare_tables import assert_table_i
from tests.conftest import QUIET, quiet
from tests.feature_files import HEARING, write_planted_set
from train.compare import run_compare
from train.config import TrainConfig, TrainError
from train.data import clip_steps, collate, model_inputs
from train.ensemble import fit_ensemble
from train.layout import COMPLETE_MARK
from train.loop import train_model
from train.runs import load_run

CPU = dict(device="cpu")
FAST = dict(epochs=10, lr=1e-3, batch_size=16, **CPU)
# Validation accuracy measured here, median of training seeds 0-4 on this planted set: face 0.52, audio 0.50,
# face-audio 1.00, caca-av 1.00 (caca, which sees faces and context but does not hear, 0.50).
TRAINED = ("face", "audio", "face-audio", "caca-av")


@pytest.fixture(scope="module")
def voice(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("voice"), "voice", {"train": 192, "val": 96}, seed=1)


@pytest.fixture(scope="module")
def silent(tmp_path_factory):
    """A small set made without audio."""
    return write_planted_set(tmp_path_factory.mktemp("silent"), "both", {"train": 16, "val": 8})


@pytest.fixture(scope="module")
def runs(voice, tmp_path_factory) -> dict[str, tuple]:
    """Each of TRAINED on the voice: its run folder and validation accuracy."""
    out = tmp_path_factory.mktemp("runs")
    accuracies = {model: train_model(TrainConfig(model=model, features=voice, out=out / model, **FAST), **QUIET)
                  for model in TRAINED}
    return {model: (out / model, metrics.accuracy) for model, metrics in accuracies.items()}


@pytest.mark.parametrize("model", ["face-audio", "caca-av"])
def test_a_label_in_the_face_and_the_voice_is_learned_by_the_models_that_see_and_hear(runs, model):
    assert runs[model][1] > 0.9


@pytest.mark.parametrize("model", ["face", "audio"])
def test_a_label_in_the_face_and_the_voice_is_half_learned_by_one_of_them(runs, model):
    assert 0.35 < runs[model][1] < 0.7


def test_a_model_that_hears_on_features_without_audio_is_refused_in_one_line(silent, tmp_path):
    status, _, stderr = run_cli("train", "--model", "caca-av", "--features", silent, "--out", tmp_path / "run",
                                "--device", "cpu")
    one_line_error(status, stderr, str(silent / "train"), "caca-av", "without audio", "extract --audio-features",
                   f"features add-audio {silent / 'train'} --out")
    assert not (tmp_path / "run").exists()


def test_compare_refuses_a_model_that_hears_on_features_without_audio_before_training_any(silent, tmp_path):
    base = TrainConfig(model="face", features=silent, epochs=1, **CPU)
    with pytest.raises(TrainError, match="model audio hears the voice"):
        run_compare(base, ["face", "audio"], seeds=1, out=tmp_path, log=quiet)
    assert not (tmp_path / "face-seed0").exists()


def test_evaluating_a_run_that_hears_on_features_without_audio_is_refused_in_one_line(runs, silent):
    status, _, stderr = run_cli("evaluate", "--run", runs["audio"][0], "--split", "val", "--features", silent,
                                "--device", "cpu")
    one_line_error(status, stderr, f"the val features in {silent} were made without audio",
                   "(audio_features: 'logmel' != 'none')", "extract them with --audio-features logmel",
                   "features add-audio --audio-features logmel")


def test_padding_and_the_rows_of_frames_without_audio_do_not_change_a_prediction(voice, runs):
    model = load_run(runs["caca-av"][0], torch.device("cpu")).model
    with open_features(voice / "val") as features:
        clips = [features[clip_id] for clip_id in features.clip_ids]
    clip = next(c for c in clips if (c["has_face"] & ~c["has_audio"]).any())  # a step without audio
    longest = max(clips, key=lambda c: len(c["has_face"]))

    def logits(*items):
        batch = collate([clip_steps(f"c{i}", c, 0, model.inputs) for i, c in enumerate(items)])
        with torch.inference_mode():
            return model(*model_inputs(model, batch, torch.device("cpu")))[0]

    alone = logits(clip)
    garbage = np.where(clip["has_audio"][:, None], clip["audio"], 1e4).astype(np.float32)
    torch.testing.assert_close(logits(dict(clip, audio=garbage)), alone, atol=0, rtol=0)
    torch.testing.assert_close(logits(clip, longest), alone, atol=1e-5, rtol=0)
    heard = dict(clip, has_audio=np.ones_like(clip["has_audio"]))  # its zeros heard as a voice
    assert not torch.allclose(logits(heard), alone)


def test_compare_with_a_model_that_hears_adds_its_row_and_the_mec_2017_baselines(voice, tmp_path):
    status, stdout, stderr = run_cli("compare", "--models", "face,audio", "--seeds", 1, "--epochs", 1, "--lr", 1e-3,
                                     "--features", voice, "--out", tmp_path, "--device", "cpu")
    assert status == 0, stderr
    assert "| MEC 2017 audio baseline (organisers' SVM) | not trained here |" in stdout
    assert "not this paper's figures, and not trained here" in stdout
    assert_table_i(tmp_path, ["face", "audio"], 1, context_dim=64, audio_dim=HEARING["audio_dim"])


def test_an_ensemble_of_a_model_that_hears_and_one_that_sees_fits_loads_and_learns_both(voice, runs, tmp_path):
    folder = fit_ensemble([runs["audio"][0], runs["face"][0]], "val", voice, tmp_path / "ensemble", device="cpu")
    # The members step through other frames (every frame, the frames with a face): the ensemble reads has_face.
    assert load_run(folder, torch.device("cpu")).model.inputs == ("face", "audio", "has_audio", "has_face")
    status, _, stderr = run_cli("evaluate", "--run", folder, "--split", "val", "--device", "cpu")
    assert status == 0, stderr
    evaluated = json.loads((folder / "eval-val" / "metrics.json").read_text())
    # Each member knows one bit: their mixed probabilities put the most on the class of both.
    assert evaluated["accuracy"] > 0.9
    # Evaluated as one model, each member on its own steps, it scores as fitted from each member's own evaluation.
    fitted = json.loads((folder / COMPLETE_MARK).read_text())
    assert (evaluated["map"], evaluated["accuracy"]) == pytest.approx((fitted["map"], fitted["accuracy"]), abs=1e-6)
