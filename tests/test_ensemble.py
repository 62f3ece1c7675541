"""The paper's section VI: the 2D-3D-CNN (`c3d`) over face maps, and its ensemble with CACA-RNN."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from features.reader import open_features, write_index
from features.writer import ShardWriter
from features.labels import CHEAVD_CLASSES
from features.schema import shard_name
from train.compare import run_compare
from train.data import clip_steps, collate, model_inputs
from train.ensemble import fit_ensemble, fit_weights
from train.config import TrainConfig
from train.config import TrainError
from train.evaluation import split_probabilities
from train.loop import train_model
from train.runs import load_run
from tests.cli_runs import run_cli
from tests.compare_tables import assert_spread, csv_rows, markdown_tables, percent_scores
from tests.conftest import QUIET, quiet
from tests.feature_files import extractor_attrs, planted_clip, write_planted_set

CPU = dict(device="cpu")
# The motion is learned within a few epochs; more only cost time on busy test machines.
FAST = dict(epochs=6, lr=1e-3, batch_size=16, **CPU)
# The weights' grid and objective as train/ensemble.py documents them: multiples of 0.05 summing
# to 1; the highest mAP, then accuracy, then the least L1 distance to equal weights.
GRID_UNITS = 20


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
    model = load_run(runs["c3d"][0], torch.device("cpu")).model
    with open_features(motion / "val") as features:
        clips = [features[clip_id] for clip_id in features.clip_ids]
    short, long = sorted(clips, key=lambda clip: len(clip["face"]))[::len(clips) - 1]
    assert len(short["face"]) < len(long["face"])

    def logits(*items):
        batch = collate([clip_steps(f"c{i}", clip, 0, ("face_map",)) for i, clip in enumerate(items)])
        with torch.inference_mode():
            return model(*model_inputs(model, batch, torch.device("cpu")))[0]

    torch.testing.assert_close(logits(short, long), logits(short), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def ensemble(runs, motion, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ensembles") / "caca+c3d"
    return fit_ensemble([runs["caca"][0], runs["c3d"][0]], "val", motion, folder, device="cpu")


def objective(labels: np.ndarray, probabilities: list[np.ndarray], weights: tuple[float, ...]) -> tuple:
    """(mAP, accuracy, -L1 distance to equal weights) of the weighted mix, computed here with scikit-learn;
    rounded so that equal values computed in another order still tie."""
    mixed = sum(w * p for w, p in zip(weights, probabilities))
    present = np.unique(labels)
    mean_ap = average_precision_score(labels[:, None] == present[None, :], mixed[:, present], average="macro")
    accuracy = float(np.mean(mixed.argmax(axis=1) == labels))
    closeness = -float(np.abs(np.array(weights) - 1 / len(weights)).sum())
    return tuple(round(value, 9) for value in (mean_ap, accuracy, closeness))


def weight_grid(members: int) -> list[tuple[float, ...]]:
    return [tuple(units / GRID_UNITS for units in point)
            for point in itertools.product(range(GRID_UNITS + 1), repeat=members) if sum(point) == GRID_UNITS]


def assert_on_the_grid(weights) -> None:
    assert sum(weights) == pytest.approx(1) and all(0 <= w <= 1 for w in weights)
    assert all(w * GRID_UNITS == pytest.approx(round(w * GRID_UNITS)) for w in weights), weights


def assert_the_grid_maximum(weights, labels: np.ndarray, probabilities: list[np.ndarray]) -> tuple:
    """`weights` score the grid's best objective; returns that objective."""
    assert_on_the_grid(weights)
    scores = {point: objective(labels, probabilities, point) for point in weight_grid(len(probabilities))}
    best = max(scores.values())
    chosen = next(point for point in scores if point == pytest.approx(tuple(weights)))
    assert scores[chosen] == best, (weights, scores[chosen], [p for p, s in scores.items() if s == best], best)
    return best


def test_ensemble_weights_are_the_maximum_of_the_weight_grid(ensemble, runs, motion):
    spec = json.loads((ensemble / "ensemble.json").read_text())
    outputs = []
    for name in ("caca", "c3d"):
        outputs.append(split_probabilities(load_run(runs[name][0], torch.device("cpu")), "val", motion,
                                           torch.device("cpu")))
    assert outputs[0][0] == outputs[1][0]
    labels, probabilities = outputs[0][1], [p for _, _, p in outputs]
    best = assert_the_grid_maximum(spec["weights"], labels, probabilities)
    assert spec["ensemble_scores"]["map"] == pytest.approx(best[0], abs=1e-6)
    assert spec["ensemble_scores"]["accuracy"] == pytest.approx(best[1], abs=1e-9)
    assert spec["ensemble_scores"]["map"] >= max(member["map"] for member in spec["member_scores"])
    assert json.loads((ensemble / "metrics.json").read_text())["map"] == spec["ensemble_scores"]["map"]


def complementary_members(members: int, clips: int = 96, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels of 4 classes and each member's probabilities: member k sees class k % 4 well and the rest by
    chance, so that the best weights mix the members."""
    rng = np.random.default_rng(seed)
    labels = np.arange(clips) % 4
    probabilities = []
    for member in range(members):
        logits = rng.normal(0, 1, (clips, 4))
        logits[labels == member % 4, member % 4] += rng.uniform(1, 3)
        probabilities.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return labels, probabilities


def test_three_members_get_the_maximum_of_the_weight_grid():
    labels, probabilities = complementary_members(3)
    weights = fit_weights(labels, probabilities, list(CHEAVD_CLASSES[:4]))
    assert_the_grid_maximum(weights, labels, probabilities)
    assert sum(w > 0 for w in weights) == 3, weights  # a mix, not a member alone


def test_more_members_get_weights_no_single_step_of_the_grid_improves():
    labels, probabilities = complementary_members(4, seed=1)
    weights = fit_weights(labels, probabilities, list(CHEAVD_CLASSES[:4]))
    assert_on_the_grid(weights)
    units = [round(w * GRID_UNITS) for w in weights]
    reached = objective(labels, probabilities, tuple(weights))
    for give, take in itertools.permutations(range(len(units)), 2):
        if units[give]:
            moved = list(units)
            moved[give] -= 1
            moved[take] += 1
            assert objective(labels, probabilities, tuple(u / GRID_UNITS for u in moved)) <= reached, (give, take)
    alone = [objective(labels, probabilities, tuple(float(i == m) for i in range(4))) for m in range(4)]
    assert reached >= max(alone) and sum(w > 0 for w in weights) > 1, weights


def write_features(root, **attrs) -> None:
    """Train and val splits of 8 clips each, made with `attrs` changed."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        with ShardWriter(root / split / shard_name(0), extractor_attrs(split=split, **attrs)) as writer:
            for i in range(8):
                writer.add_clip(planted_clip(f"{split}/{i}", i % 2, np.zeros(128), np.zeros(64),
                                             np.random.default_rng(i), 64))
        write_index(root / split)


OTHER_CLASSES = list(CHEAVD_CLASSES[:4])


@pytest.mark.parametrize("changed, named", [({"fps": 2.0}, "fps"), ({"classes": OTHER_CLASSES}, repr(OTHER_CLASSES))],
                         ids=["fps", "classes"])
def test_ensemble_refuses_members_made_from_other_features_or_classes(runs, tmp_path, changed, named):
    write_features(tmp_path / "other", **changed)
    train_model(TrainConfig(model="face", features=tmp_path / "other", out=tmp_path / "face", epochs=1, **CPU), **QUIET)
    with pytest.raises(TrainError) as refused:
        fit_ensemble([runs["c3d"][0], tmp_path / "face"], "val", out=tmp_path / "ensemble", device="cpu")
    message = str(refused.value)
    assert "\n" not in message and f"member {tmp_path / 'face'}" in message and named in message, message
    assert not (tmp_path / "ensemble").exists()


def test_evaluate_takes_an_ensemble_like_a_run(ensemble):
    status, _, stderr = run_cli("evaluate", "--run", ensemble, "--split", "val", "--device", "cpu")
    assert status == 0, stderr
    metrics = json.loads((ensemble / "eval-val" / "metrics.json").read_text())
    fitted = json.loads((ensemble / "ensemble.json").read_text())["ensemble_scores"]
    assert metrics["map"] == pytest.approx(fitted["map"], abs=1e-6)
    model = load_run(ensemble, torch.device("cpu")).model
    assert model.inputs == ("face", "context", "face_map")  # caca's and c3d's, read once each


def test_compare_with_caca_and_c3d_adds_table_ii(motion, tmp_path):
    base = TrainConfig(model="caca", features=motion, epochs=2, lr=1e-3, **CPU)
    table = run_compare(base, ["caca", "c3d"], seeds=1, out=tmp_path, log=quiet)
    table_i, table_ii = markdown_tables(table)
    assert list(table_i) == ["caca", "c3d"] and list(table_ii) == ["c3d", "caca", "ensemble (caca+c3d)"]
    assert table_ii["ensemble (caca+c3d)"][-4:] == ["52.16", "56.58", "44.74", "52.99"]  # the paper's Table II
    folders = {"c3d": "c3d-seed0", "caca": "caca-seed0", "ensemble (caca+c3d)": "ensemble-seed0"}
    for name, row in csv_rows(tmp_path / "table-ii.csv").items():
        assert row == table_ii[name]
        folder = tmp_path / folders[name]
        for cell, value in zip(row[:4], (*percent_scores(folder / "metrics.json"),
                                         *percent_scores(folder / "eval-test" / "metrics.json"))):
            assert_spread(cell, [value])
    for name, row in table_i.items():
        for cell, value in zip(row[:2], percent_scores(tmp_path / folders[name] / "metrics.json")):
            assert_spread(cell, [value])


def test_the_ensemble_command_takes_its_members_after_one_runs(runs, tmp_path):
    status, _, stderr = run_cli("ensemble", "--runs", runs["caca"][0], runs["c3d"][0], "--out", tmp_path / "e",
                                "--device", "cpu")
    assert status == 0, stderr
    assert len(json.loads((tmp_path / "e" / "ensemble.json").read_text())["members"]) == 2
