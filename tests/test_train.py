"""Stage 2 on feature files with planted signals: who learns what, masking, runs, evaluate, compare."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

from features import ShardWriter, open_features, write_index
from features.reader import FeatureSet
from features.schema import shard_name
from train.compare import run_compare
from features.tools import inspect, merge, repack
from train.data import STEP_INPUTS, ClipDataset, clip_steps, collate, in_memory_bytes, make_loader, should_preload
from train.config import TrainConfig
from train.loop import TrainError, class_weights, evaluate_run, load_run, train_model
from tests.feature_files import extractor_attrs, planted_clip, write_planted_set

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(epochs=10, lr=1e-3, batch_size=16)


@pytest.fixture(scope="module")
def face_signal(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("face"), "face", {"train": 128, "val": 64})


@pytest.fixture(scope="module")
def both_signal(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("both"), "both", {"train": 192, "val": 96}, seed=1)


def accuracy_of(model: str, features: Path, out: Path, **changes) -> float:
    config = TrainConfig(model=model, features=features, out=out / model, **{**FAST, **changes})
    return train_model(config, progress=False, log=lambda line: None).accuracy


@pytest.mark.parametrize("model", ["face", "concat", "parallel", "caca", "caca-b"])
def test_a_label_in_the_face_stream_is_learned_by_models_that_read_faces(face_signal, tmp_path, model):
    assert accuracy_of(model, face_signal, tmp_path) > 0.9


def test_a_label_in_the_face_stream_is_not_learned_from_context(face_signal, tmp_path):
    assert accuracy_of("context", face_signal, tmp_path) < 0.45


@pytest.mark.parametrize("model", ["concat", "parallel", "caca", "caca-b"])
def test_a_label_needing_both_streams_is_learned_by_the_fusion_models(both_signal, tmp_path, model):
    assert accuracy_of(model, both_signal, tmp_path) > 0.9


@pytest.mark.parametrize("model", ["face", "context"])
def test_a_label_needing_both_streams_is_not_learned_by_one_stream(both_signal, tmp_path, model):
    assert accuracy_of(model, both_signal, tmp_path) < 0.7


@pytest.fixture(scope="module")
def caca_run(both_signal, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "caca"
    train_model(TrainConfig(model="caca", features=both_signal, out=out, **FAST), progress=False, log=lambda l: None)
    return out


def with_faceless_frames(clip: dict, extra: int) -> dict:
    """The clip with `extra` frames appended where no face was found (context still varies)."""
    filler = {
        "face": np.zeros((extra, 128), np.float32),
        "has_face": np.zeros(extra, bool),
        "context": np.random.default_rng(0).normal(size=(extra, clip["context"].shape[1])).astype(clip["context"].dtype),
    }
    return {**clip, **{name: np.concatenate([clip[name], rows]) for name, rows in filler.items()}}


def test_faceless_frames_and_padding_do_not_change_a_prediction(both_signal, caca_run):
    model, _ = load_run(caca_run, torch.device("cpu"))
    with open_features(both_signal / "val") as features:
        clip, other = (features[i] for i in features.clip_ids[:2])

    def logits(*clips):
        batch = collate([clip_steps(f"c{i}", c, 0, model.inputs) for i, c in enumerate(clips)])
        with torch.inference_mode():
            return model(batch["face"], batch["context"], batch["mask"])[0]

    alone = logits(clip)
    torch.testing.assert_close(logits(with_faceless_frames(clip, 3)), alone, atol=0, rtol=0)
    longer = {name: np.concatenate([other[name]] * 3) for name in ("face", "context", "has_face")}
    torch.testing.assert_close(logits(clip, longer), alone, atol=1e-5, rtol=0)


def test_training_is_deterministic_given_a_seed(both_signal, tmp_path):
    runs = [TrainConfig(model="parallel", features=both_signal, out=tmp_path / f"r{i}", epochs=3, seed=7) for i in (0, 1)]
    for config in runs:
        train_model(config, progress=False, log=lambda line: None)
    assert (runs[0].run_folder / "epochs.csv").read_text().split("\n")[1].split(",")[:4] == \
        (runs[1].run_folder / "epochs.csv").read_text().split("\n")[1].split(",")[:4]
    a, b = (torch.load(c.run_folder / "best.pt", weights_only=False)["model"] for c in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_folder_holds_config_attrs_epochs_checkpoint_and_metrics(caca_run, both_signal):
    assert json.loads((caca_run / "config.json").read_text())["model"] == "caca"
    with open_features(both_signal / "train") as features:
        assert json.loads((caca_run / "features.json").read_text()) == json.loads(json.dumps(features.attrs))
    epochs = pd.read_csv(caca_run / "epochs.csv")
    assert list(epochs.epoch) == list(range(1, FAST["epochs"] + 1))
    metrics = json.loads((caca_run / "metrics.json").read_text())
    assert metrics["map"] == pytest.approx(epochs.val_map.max(), abs=1e-6)


def test_evaluate_writes_metrics_that_agree_with_scikit_learn(caca_run):
    done = subprocess.run([sys.executable, "cli.py", "evaluate", "--run", str(caca_run), "--split", "val"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = caca_run / "eval-val"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"map", "accuracy", "per_class_ap", "confusion"} <= set(metrics)
    predictions = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    classes = metrics["classes"]
    truth = np.array([classes.index(t) for t in predictions["true"]])
    scores = predictions[[f"p_{c}" for c in classes]].to_numpy()
    present = sorted(set(truth))
    expected = average_precision_score(np.eye(len(classes))[truth][:, present], scores[:, present], average="macro")
    assert metrics["map"] == pytest.approx(expected, abs=1e-6)
    assert (out / "confusion.png").stat().st_size > 10_000


def test_evaluate_refuses_features_made_differently(caca_run, tmp_path):
    other = write_planted_set(tmp_path, "both", {"val": 8})
    attrs_file = other / "val" / shard_name(0)
    attrs_file.unlink()
    with ShardWriter(attrs_file, extractor_attrs(split="val", context_backbone="mobilenet_v2")) as writer:
        writer.add_clip(planted_clip("v/0", 0, np.zeros(128), np.zeros(64), np.random.default_rng(0), 64))
    write_index(other / "val")
    with pytest.raises(TrainError, match="context_backbone"):
        evaluate_run(caca_run, "val", features=other)


def test_an_unlabelled_split_gets_predictions_only(caca_run, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    rng = np.random.default_rng(1)
    with ShardWriter(folder / shard_name(0), extractor_attrs(split="test")) as writer:
        for i in range(6):
            clip = planted_clip(f"test/{i}", 0, np.zeros(128), np.zeros(64), rng, 64)
            writer.add_clip(dataclasses.replace(clip, label=""))
    write_index(folder)
    assert evaluate_run(caca_run, "test", features=tmp_path) is None
    predictions = pd.read_csv(caca_run / "eval-test" / "predictions.csv", keep_default_na=False)
    assert len(predictions) == 6 and set(predictions["true"]) == {""}


def test_compare_resumes_from_finished_runs(both_signal, tmp_path):
    base = TrainConfig(model="face", features=both_signal, epochs=2, lr=1e-3)
    lines = []
    table = run_compare(base, ["face", "caca"], seeds=2, out=tmp_path, log=lines.append)
    assert "| caca |" in table.read_text() and (tmp_path / "table.csv").exists()
    assert (tmp_path / "parameters.txt").read_text().count("M") > 6
    (tmp_path / "caca-seed1" / "metrics.json").unlink()  # as if interrupted during that run
    lines.clear()
    run_compare(base, ["face", "caca"], seeds=2, out=tmp_path, log=lines.append)
    assert lines[0] == "3 of 4 runs already finished; training 1"


def test_class_weights_favour_rare_classes():
    weights = class_weights([0, 0, 0, 1, -1], num_classes=3)
    assert weights[1] > weights[0] > 0 and weights[2] == 0
    assert float((weights[[0, 0, 0, 1]]).mean()) == pytest.approx(1.0)


def test_training_needs_labelled_splits(both_signal, tmp_path):
    with pytest.raises(TrainError, match="no features for split 'nope'"):
        train_model(TrainConfig(model="face", features=both_signal, val_split="nope", out=tmp_path / "x"))


def test_preloading_is_automatic_when_the_split_fits_in_memory(both_signal):
    with open_features(both_signal / "train") as features:
        assert should_preload(features, "auto", STEP_INPUTS) and should_preload(features, "always", STEP_INPUTS)
        assert not should_preload(features, "never", ("face",))
        assert in_memory_bytes(features, ("face", "context")) == features.n_frames * (128 * 4 + 64 * 2)
        assert in_memory_bytes(features, ("face",)) == features.n_frames * 128 * 4
        assert in_memory_bytes(features, ("face_map",)) == features.n_frames * 128 * 4 * 4 * 2


@pytest.mark.parametrize("model", ["face", "context", "caca", "c3d"])
def test_a_model_trains_on_only_the_arrays_it_reads(both_signal, tmp_path, monkeypatch, model):
    read = set()
    original = FeatureSet.read

    def recording(self, clip_id, arrays=None):
        read.update(arrays)
        return original(self, clip_id, arrays)

    monkeypatch.setattr(FeatureSet, "read", recording)
    config = TrainConfig(model=model, features=both_signal, out=tmp_path / "run", preload="never", epochs=1)
    train_model(config, progress=False, log=lambda line: None)
    assert read == {"has_face", *{"face": ["face"], "context": ["context"], "c3d": ["face_map"]}.get(model, ["face", "context"])}


def test_gzip_and_uncompressed_shards_give_identical_batches(both_signal, tmp_path):
    repack(both_signal / "train", tmp_path / "train", "none")
    batches = {}
    for name, folder in (("gzip", both_signal / "train"), ("none", tmp_path / "train")):
        with open_features(folder) as features:
            dataset = ClipDataset(features, list(features.attrs["classes"]), train=True, inputs=STEP_INPUTS)
            assert dataset.arrays == ("has_face", "face", "context", "face_map")
            torch.manual_seed(0)  # each clip's random start (training augmentation) is drawn from it
            batches[name] = list(make_loader(dataset, batch_size=16, num_workers=0, seed=3, shuffle=True))
    assert len(batches["gzip"]) == len(batches["none"]) > 1
    for gzip_batch, none_batch in zip(batches["gzip"], batches["none"]):
        assert gzip_batch["clip_id"] == none_batch["clip_id"]
        for key in ("face", "context", "face_map", "mask", "label"):
            assert torch.equal(gzip_batch[key], none_batch[key]), key


def test_an_uncompressed_and_a_gzip_part_merge_and_train_together(tmp_path):
    root = write_planted_set(tmp_path / "parts", "face", {"part-a": 64, "part-b": 64, "val": 32})
    repack(root / "part-b", tmp_path / "part-b-none", "none")
    merge([root / "part-a", tmp_path / "part-b-none"], root / "train")
    assert "gzip in 1 of 2 shards, none in 1 of 2 shards" in inspect(root / "train")
    config = TrainConfig(model="face", features=root, out=tmp_path / "run", preload="never", **FAST)
    assert train_model(config, progress=False, log=lambda line: None).accuracy > 0.9
