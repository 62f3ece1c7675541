"""A run folder as one typed value (train/runs.py): what is written is what loads, in the format runs have always had.

The files on disk do not change with the types: best.pt is the dict of CHECKPOINT_KEYS it has
always been, config.json the settings' JSON, ensemble.json its members, weights and scores.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from features.recipe import FeatureRecipe
from tests.feature_files import write_planted_set
from train.config import TrainConfig
from train.ensemble import fit_ensemble
from train.loop import train_model
from train.metrics import Metrics
from train.runs import CHECKPOINT_KEYS, ENSEMBLE_MODEL, Checkpoint, EnsembleSpec, Scores, load_run
from tests.conftest import QUIET

QUIET = dict(**QUIET)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    features = write_planted_set(root / "features", "both", {"train": 16, "val": 8}, context_dim=16)
    folders = {}
    for model in ("face", "concat"):
        folders[model] = root / model
        train_model(TrainConfig(model=model, features=features, out=folders[model], epochs=2, lr=1e-3, device="cpu",
                                batch_size=8), **QUIET)
    folders["ensemble"] = fit_ensemble([folders["face"], folders["concat"]], out=root / "ensemble", device="cpu")
    return folders


def test_a_config_round_trips_through_json_exactly():
    for config in (TrainConfig(model="caca"),
                   TrainConfig(model="c3d", features=Path("/data/f"), out=Path("runs/x"), epochs=3, lr=0.5, seed=7,
                               device="cuda:1", num_workers=2, class_weighting=True, preload="never",
                               precision="bfloat16")):
        assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_a_config_json_older_than_a_setting_reads_the_value_runs_had_before_it():
    older = TrainConfig(model="face").to_json()
    del older["precision"]
    assert TrainConfig.from_json(older).precision == "float32"


@pytest.mark.parametrize("change, message", [
    (dict(epochs=0), "epochs 0 is not an int of 1 or more"),
    (dict(lr="fast"), "lr 'fast' is not a positive number"),
    (dict(model="gpt"), "model 'gpt' is not one of face, context"),
    (dict(class_weighting=1), "class_weighting 1 is not true or false"),
    (dict(colour="red"), "settings colour unknown"),
])
def test_a_config_json_of_other_settings_or_values_is_refused_saying_what(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_json({**TrainConfig(model="face").to_json(), **change})
    data = TrainConfig(model="face").to_json()
    del data["seed"]
    with pytest.raises(ValueError, match="settings seed missing"):
        TrainConfig.from_json(data)


def test_a_run_loads_as_what_its_files_say(runs):
    folder = runs["concat"]
    run = load_run(folder, CPU)
    assert run.name == "concat" and run.folder == folder
    assert run.config == TrainConfig.from_json(json.loads((folder / "config.json").read_text()))
    attrs = json.loads((folder / "features.json").read_text())
    assert run.attrs == attrs and run.recipe == FeatureRecipe.from_attrs(attrs)
    assert run.features == run.config.features and run.classes == attrs["classes"]
    assert run.metrics == Metrics.from_json(json.loads((folder / "metrics.json").read_text()))
    assert not run.model.training and run.model.inputs == ("face", "context")


def test_best_pt_keeps_the_format_every_run_has_had(runs):
    contents = torch.load(runs["face"] / "best.pt", weights_only=True)
    assert tuple(contents) == CHECKPOINT_KEYS
    assert contents["config"] == json.loads((runs["face"] / "config.json").read_text())
    assert contents["attrs"] == json.loads((runs["face"] / "features.json").read_text())
    checkpoint = Checkpoint.read(runs["face"] / "best.pt", CPU)
    assert checkpoint.config == load_run(runs["face"], CPU).config and 1 <= checkpoint.epoch <= 2


def test_an_unfinished_run_loads_without_metrics(runs, tmp_path):
    copy = tmp_path / "unfinished"
    copy.mkdir()
    for name in ("best.pt", "config.json", "features.json"):
        (copy / name).write_bytes((runs["face"] / name).read_bytes())
    assert load_run(copy, CPU).metrics is None


def test_an_ensemble_loads_as_one_run_of_its_members(runs):
    ensemble = load_run(runs["ensemble"], CPU)
    face, concat = (load_run(runs[name], CPU) for name in ("face", "concat"))
    spec = json.loads((runs["ensemble"] / "ensemble.json").read_text())
    assert ensemble.name == ENSEMBLE_MODEL and isinstance(ensemble.config, EnsembleSpec)
    assert ensemble.config.members == spec["members"] == ["../face", "../concat"]
    assert ensemble.config.weights == spec["weights"] and ensemble.config.fitting.split == "val"
    assert ensemble.config.fitting.ensemble_scores == Scores.from_json(spec["ensemble_scores"])
    assert (ensemble.features, ensemble.attrs, ensemble.recipe) == (face.features, face.attrs, face.recipe)
    assert ensemble.classes == face.classes == concat.classes
    assert ensemble.metrics.map == spec["ensemble_scores"]["map"]


def test_ensemble_json_is_written_and_read_back_exactly(runs, tmp_path):
    spec = EnsembleSpec.read(runs["ensemble"])
    spec.write(tmp_path)
    assert json.loads((tmp_path / "ensemble.json").read_text()) == json.loads(
        (runs["ensemble"] / "ensemble.json").read_text())
    assert EnsembleSpec.read(tmp_path) == spec
    by_hand = dataclasses.replace(spec, fitting=None)  # as the README allows: members, weights and classes
    by_hand.write(tmp_path)
    assert EnsembleSpec.read(tmp_path) == by_hand
