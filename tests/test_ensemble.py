"""The paper's section VI: the 2D-3D-CNN (`c3d`) over face maps, and its ensemble with CACA-RNN."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from features import ShardWriter, open_features, write_index
from features.schema import shard_name
from train.compare import run_compare
from train.data import clip_steps, collate
from train.ensemble import fit_ensemble
from train.config import TrainConfig
from train.loop import TrainError, load_run, train_model
from tests.feature_files import extractor_attrs, planted_clip, write_planted_set

ROOT = Path(__file__).resolve().parents[1]
# The motion is learned within a few epochs; more only cost time on busy test machines.
FAST = dict(epochs=6, lr=1e-3, batch_size=16)
QUIET = dict(progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("motion"), "face_map_motion",
                             {"train": 128, "val": 64, "test": 32}, seed=2)


@pytest.fixture(scope="module")
def runs(motion, tmp_path_factory):
    """A c3d run and a quick (hence weak) caca run on the moving-spot features, with their val accuracy."""
    out = tmp_path_factory.mktemp("runs")
    c3d = train_model(TrainConfig(model="c3d", features=motion, out=out / "c3d", **FAST), **QUIET)
    caca = train_model(TrainConfig(model="caca", features=motion, out=out / "caca", **{**FAST, "epochs": 2}), **QUIET)
    return {"c3d": (out / "c3d", c3d.accuracy), "caca": (out / "caca", caca.accuracy)}


def test_a_label_in_the_motion_of_the_face_maps_is_learned_by_c3d(runs):
    assert runs["c3d"][1] > 0.9


def test_a_label_in_the_motion_of_the_face_maps_is_not_learned_from_pooled_face_features(motion, tmp_path):
    # The face vectors have the same distribution in every class: no number of epochs helps.
    config = TrainConfig(model="face", features=motion, out=tmp_path / "face", **{**FAST, "epochs": 3})
    assert train_model(config, **QUIET).accuracy < 0.6


def test_c3d_padding_gives_the_same_logits_as_the_clip_alone(motion, runs):
    model, _ = load_run(runs["c3d"][0], torch.device("cpu"))
    with open_features(motion / "val") as features:
        clips = [features[clip_id] for clip_id in features.clip_ids]
    short, long = sorted(clips, key=lambda clip: len(clip["face"]))[::len(clips) - 1]
    assert len(short["face"]) < len(long["face"])

    def logits(*items):
        batch = collate([clip_steps(f"c{i}", clip, 0, ("face_map",)) for i, clip in enumerate(items)])
        with torch.inference_mode():
            return model(None, None, batch["mask"], face_map=batch["face_map"])[0]

    torch.testing.assert_close(logits(short, long), logits(short), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def ensemble(runs, motion, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensembles") / "caca+c3d"
    return fit_ensemble([runs["caca"][0], runs["c3d"][0]], "val", motion, folder)


def test_ensemble_weights_are_a_convex_combination_no_worse_than_the_best_member(ensemble):
    spec = json.loads((ensemble / "ensemble.json").read_text())
    assert all(0 <= w <= 1 for w in spec["weights"]) and sum(spec["weights"]) == pytest.approx(1)
    assert spec["ensemble_scores"]["map"] >= max(member["map"] for member in spec["member_scores"])
    assert json.loads((ensemble / "metrics.json").read_text())["map"] == spec["ensemble_scores"]["map"]


def test_ensemble_refuses_members_made_from_other_features(runs, tmp_path):
    other = tmp_path / "other"
    for split in ("train", "val"):
        (other / split).mkdir(parents=True)
        with ShardWriter(other / split / shard_name(0), extractor_attrs(split=split, fps=2.0)) as writer:
            for i in range(8):
                writer.add_clip(planted_clip(f"{split}/{i}", i % 2, np.zeros(128), np.zeros(64),
                                             np.random.default_rng(i), 64))
        write_index(other / split)
    train_model(TrainConfig(model="face", features=other, out=tmp_path / "face", epochs=1), **QUIET)
    with pytest.raises(TrainError, match="fps"):
        fit_ensemble([runs["c3d"][0], tmp_path / "face"], "val", out=tmp_path / "ensemble")


def test_evaluate_takes_an_ensemble_like_a_run(ensemble):
    done = subprocess.run([sys.executable, "cli.py", "evaluate", "--run", str(ensemble), "--split", "val"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((ensemble / "eval-val" / "metrics.json").read_text())
    fitted = json.loads((ensemble / "ensemble.json").read_text())["ensemble_scores"]
    assert metrics["map"] == pytest.approx(fitted["map"], abs=1e-6)
    model, _ = load_run(ensemble, torch.device("cpu"))
    assert model.inputs == ("face", "context", "face_map")  # caca's and c3d's, read once each


def test_compare_with_caca_and_c3d_adds_table_ii(motion, tmp_path):
    base = TrainConfig(model="caca", features=motion, epochs=2, lr=1e-3)
    table = run_compare(base, ["caca", "c3d"], seeds=1, out=tmp_path, log=lambda line: None).read_text()
    assert "| c3d |" in table and "| ensemble (caca+c3d) |" in table and "52.99" in table
    rows = (tmp_path / "table-ii.csv").read_text().splitlines()
    assert len(rows) == 4 and "no labelled test split" not in rows[3]


def test_the_ensemble_command_takes_its_members_after_one_runs(runs, tmp_path):
    done = subprocess.run([sys.executable, "cli.py", "ensemble", "--runs", str(runs["caca"][0]), str(runs["c3d"][0]),
                           "--out", str(tmp_path / "e")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "e" / "ensemble.json").read_text())["members"]) == 2
