"""Stage 2 on feature files with planted signals: who learns what, masking, runs, evaluate, compare."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

from features.reader import FeatureSet, open_features, write_index
from features.writer import ShardWriter
from features.schema import shard_name
from train.compare import run_compare
from features.tools import inspect, merge, repack
from train.data import STEP_INPUTS, ClipDataset, clip_steps, collate, make_loader, model_inputs
from train.packed import in_memory_bytes, packed_in_memory, preloaded
from train.config import AUDIO_MODELS, TrainConfig
from train.config import TrainError
from train.evaluation import evaluate_run
from train.loop import MixedPrecision, TimedLoader, class_weights, train_model
from train.runs import load_run
from tests.cli_runs import one_line_error, run_cli
from tests.compare_tables import assert_table_i, markdown_tables
from tests.feature_files import extractor_attrs, planted_clip, write_planted_set
from tests.conftest import QUIET, quiet

# Every run here is on the CPU, where training is deterministic for a seed (README, "Training").
CPU = dict(device="cpu")
FAST = dict(epochs=10, lr=1e-3, batch_size=16, **CPU)
# The step inputs of a set made without audio (the planted sets here): all but the voice.
SEEN = tuple(name for name in STEP_INPUTS if name not in ("audio", "has_audio"))


@pytest.fixture(scope="module")
def face_signal(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("face"), "face", {"train": 128, "val": 64})


@pytest.fixture(scope="module")
def both_signal(tmp_path_factory):
    return write_planted_set(tmp_path_factory.mktemp("both"), "both", {"train": 192, "val": 96}, seed=1)


def accuracy_of(model: str, features: Path, out: Path, **changes) -> float:
    config = TrainConfig(model=model, features=features, out=out / model, **{**FAST, **changes})
    return train_model(config, **QUIET).accuracy


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


def test_training_in_bfloat16_learns_what_float32_learns(both_signal, tmp_path):
    # float32 learns it by the second epoch (of FAST's 10): three epochs of bfloat16 must too.
    # caca learns it too, but its cascade steps are several times slower in bfloat16 on the CPU (about a minute here).
    assert accuracy_of("concat", both_signal, tmp_path, precision="bfloat16", epochs=3) > 0.9
    assert json.loads((tmp_path / "concat" / "config.json").read_text())["precision"] == "bfloat16"
    weights = torch.load(tmp_path / "concat" / "best.pt", weights_only=True)["model"]
    assert {value.dtype for value in weights.values() if value.is_floating_point()} == {torch.float32}


def test_training_in_float16_on_the_cpu_is_refused_in_one_line(both_signal, tmp_path):
    status, _, stderr = run_cli("train", "--model", "face", "--features", both_signal, "--out", tmp_path / "run",
                                "--device", "cpu", "--precision", "float16")
    one_line_error(status, stderr, "float16", "bfloat16")
    assert not (tmp_path / "run").exists()


def one_step(model: torch.nn.Module, precision: MixedPrecision, loss_of) -> None:
    """One SGD step (lr 1) of `model` on the loss `loss_of(model)` computed under `precision`."""
    with precision.forward():
        loss = loss_of(model)
    precision.step(loss, torch.optim.SGD(model.parameters(), lr=1.0))


def test_float16_steps_scale_the_loss_and_give_the_optimiser_true_gradients_or_skip_overflows():
    # The GPU's float16 path (GradScaler), run on the CPU: the scaled loss keeps small gradients
    # from flushing to zero, the optimiser must see them unscaled, and a step that overflows is skipped.
    torch.manual_seed(0)
    inputs, target = torch.randn(8, 16), torch.randint(0, 4, (8,))
    plain = torch.nn.Linear(16, 4)
    scaled = torch.nn.Linear(16, 4)
    scaled.load_state_dict(plain.state_dict())
    loss_of = lambda model: torch.nn.functional.cross_entropy(model(inputs), target)  # noqa: E731
    one_step(plain, MixedPrecision(torch.device("cpu"), "float32"), loss_of)
    float16 = MixedPrecision(torch.device("cpu"), "float16")
    assert float16.scaler.get_scale() > 1
    one_step(scaled, float16, loss_of)
    torch.testing.assert_close(scaled.weight, plain.weight, atol=2e-3, rtol=0)

    before, scale = scaled.weight.detach().clone(), float16.scaler.get_scale()
    one_step(scaled, float16, lambda model: loss_of(model) * float("inf"))
    assert torch.equal(scaled.weight, before) and float16.scaler.get_scale() < scale


@pytest.fixture(scope="module")
def caca_run(both_signal, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "caca"
    train_model(TrainConfig(model="caca", features=both_signal, out=out, **FAST), **QUIET)
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
    model = load_run(caca_run, torch.device("cpu")).model
    with open_features(both_signal / "val") as features:
        clip, other = (features[i] for i in features.clip_ids[:2])

    def logits(*clips):
        batch = collate([clip_steps(f"c{i}", c, 0, model.inputs) for i, c in enumerate(clips)])
        with torch.inference_mode():
            return model(*model_inputs(model, batch, torch.device("cpu")))[0]

    alone = logits(clip)
    torch.testing.assert_close(logits(with_faceless_frames(clip, 3)), alone, atol=0, rtol=0)
    longer = {name: np.concatenate([other[name]] * 3) for name in ("face", "context", "has_face")}
    torch.testing.assert_close(logits(clip, longer), alone, atol=1e-5, rtol=0)


def test_training_is_deterministic_given_a_seed(both_signal, tmp_path):
    runs = [TrainConfig(model="parallel", features=both_signal, out=tmp_path / f"r{i}", epochs=3, seed=7, **CPU)
            for i in (0, 1)]
    for config in runs:
        train_model(config, **QUIET)
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
    assert ((0 < epochs.data_seconds) & (epochs.data_seconds < epochs.seconds)).all()
    metrics = json.loads((caca_run / "metrics.json").read_text())
    assert metrics["map"] == pytest.approx(epochs.val_map.max(), abs=1e-6)


def test_waiting_for_data_is_the_time_spent_in_the_loader():
    class SlowLoader:
        def __len__(self):
            return 3

        def __iter__(self):
            for batch in range(3):
                time.sleep(0.05)
                yield batch

    timed = TimedLoader(SlowLoader())
    assert len(timed) == 3 and list(timed) == [0, 1, 2]
    assert timed.waiting >= 0.15


def test_best_pt_holds_the_epoch_with_the_best_validation_map(caca_run):
    epochs = pd.read_csv(caca_run / "epochs.csv")
    # Ties in mAP go to the better accuracy, then to the earlier epoch (train/loop.py).
    best = epochs.sort_values(["val_map", "val_accuracy", "epoch"], ascending=[False, False, True]).iloc[0]
    assert torch.load(caca_run / "best.pt", weights_only=True)["epoch"] == best.epoch
    again = evaluate_run(caca_run, "val", device="cpu")
    assert (again.map, again.accuracy) == pytest.approx((best.val_map, best.val_accuracy), abs=1e-6)


def test_evaluate_writes_metrics_that_agree_with_scikit_learn(caca_run):
    status, _, stderr = run_cli("evaluate", "--run", caca_run, "--split", "val", "--device", "cpu")
    assert status == 0, stderr
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
        evaluate_run(caca_run, "val", features=other, device="cpu")


def test_an_unlabelled_split_gets_predictions_only(caca_run, tmp_path):
    folder = tmp_path / "test"
    folder.mkdir()
    rng = np.random.default_rng(1)
    with ShardWriter(folder / shard_name(0), extractor_attrs(split="test")) as writer:
        for i in range(6):
            clip = planted_clip(f"test/{i}", 0, np.zeros(128), np.zeros(64), rng, 64)
            writer.add_clip(dataclasses.replace(clip, label=""))
    write_index(folder)
    assert evaluate_run(caca_run, "test", features=tmp_path, device="cpu") is None
    predictions = pd.read_csv(caca_run / "eval-test" / "predictions.csv", keep_default_na=False)
    assert len(predictions) == 6 and set(predictions["true"]) == {""}


def run_files(out: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file of the comparison's run folders, with its bytes and modification time."""
    return {path: (path.read_bytes(), path.stat().st_mtime_ns)
            for path in out.glob("*-seed*/*") if path.is_file()}


def test_compare_tables_the_runs_medians_and_ranges_and_resumes_without_training_twice(both_signal, tmp_path):
    models, seeds = ["face", "caca"], 3
    base = TrainConfig(model="face", features=both_signal, epochs=2, lr=1e-3, **CPU)
    lines = []
    table = run_compare(base, models, seeds=seeds, out=tmp_path, log=lines.append)
    assert [line for line in lines if line.startswith("training ")] == [
        f"training {model}, seed {seed}" for model in models for seed in range(seeds)]
    assert table == tmp_path / "table.md" and len(markdown_tables(table)) == 1  # Table I alone
    assert_table_i(tmp_path, models, seeds, context_dim=64)
    assert (tmp_path / "parameters.txt").read_text().count("M") > 6

    first_table = table.read_text()
    (tmp_path / "caca-seed1" / "metrics.json").unlink()  # as if interrupted during that run
    finished = {path: stamp for path, stamp in run_files(tmp_path).items() if path.parent.name != "caca-seed1"}
    lines.clear()
    run_compare(base, models, seeds=seeds, out=tmp_path, log=lines.append)
    assert lines[0] == f"{len(models) * seeds - 1} of {len(models) * seeds} runs already finished; training 1"
    assert [line for line in lines if line.startswith("training ")] == ["training caca, seed 1"]
    assert {path: stamp for path, stamp in run_files(tmp_path).items() if path in finished} == finished
    assert len(pd.read_csv(tmp_path / "caca-seed1" / "epochs.csv")) == base.epochs
    assert table.read_text() == first_table, "the run trained again with its seed scores as before"

    everything = run_files(tmp_path)
    lines.clear()
    run_compare(base, models, seeds=seeds, out=tmp_path, log=lines.append)
    assert lines == [f"{len(models) * seeds} of {len(models) * seeds} runs already finished; training 0"]
    assert run_files(tmp_path) == everything


def test_a_run_of_another_precision_is_not_reused_by_compare_and_one_without_the_field_is_float32(
        face_signal, tmp_path):
    base = TrainConfig(model="face", features=face_signal, epochs=1, **CPU)
    run_compare(base, ["face"], seeds=1, out=tmp_path, log=quiet)
    config_file = tmp_path / "face-seed0" / "config.json"
    assert json.loads(config_file.read_text())["precision"] == "float32"
    with pytest.raises(TrainError, match="there != here: precision: 'float32' != 'bfloat16'"):
        run_compare(dataclasses.replace(base, precision="bfloat16"), ["face"], seeds=1, out=tmp_path,
                    log=quiet)

    older = json.loads(config_file.read_text())
    del older["precision"]  # a run trained before the setting existed, in float32
    config_file.write_text(json.dumps(older))
    lines = []
    run_compare(base, ["face"], seeds=1, out=tmp_path, log=lines.append)
    assert lines[0] == "1 of 1 runs already finished; training 0"


def test_class_weights_favour_rare_classes():
    weights = class_weights([0, 0, 0, 1, -1], num_classes=3)
    assert weights[1] > weights[0] > 0 and weights[2] == 0
    assert float((weights[[0, 0, 0, 1]]).mean()) == pytest.approx(1.0)


def write_labelled_split(folder: Path, labels: list[int], seed: int) -> None:
    """One shard of face-signal clips with these labels (indices into the classes), in this order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(0).normal(0, 1, (max(labels) + 1, 128))
    with ShardWriter(folder / shard_name(0), extractor_attrs(split=folder.name)) as writer:
        for i, label in enumerate(labels):
            writer.add_clip(planted_clip(f"{folder.name}/{i:04d}", label, directions[label], np.zeros(64), rng, 64))
    write_index(folder)


class RecordedLoss(torch.nn.CrossEntropyLoss):
    """The training loss, keeping each call's weight, logits, targets and value."""

    calls: list[tuple] = []

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        RecordedLoss.calls.append((self.weight, logits.detach().clone(), target.clone(), loss.detach()))
        return loss


def test_class_weighting_weights_the_training_loss_by_inverse_class_frequency(tmp_path, monkeypatch):
    train_labels = [0] * 24 + [1] * 6 + [2] * 2
    write_labelled_split(tmp_path / "features" / "train", train_labels, seed=1)
    write_labelled_split(tmp_path / "features" / "val", [0, 1, 2] * 4, seed=2)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", RecordedLoss)
    first_calls = {}
    for weighting in (False, True):
        RecordedLoss.calls = []
        config = TrainConfig(model="face", features=tmp_path / "features", out=tmp_path / f"weighting-{weighting}",
                             epochs=1, batch_size=len(train_labels), class_weighting=weighting, **CPU)
        train_model(config, **QUIET)
        (first_calls[weighting],) = RecordedLoss.calls  # one epoch of one batch

    counts = np.bincount(train_labels, minlength=len(extractor_attrs()["classes"]))
    present = counts > 0
    expected = np.where(present, len(train_labels) / (present.sum() * np.maximum(counts, 1)), 0.0)
    (plain_weight, logits, target, plain_loss), (weight, weighted_logits, weighted_target, loss) = first_calls.values()
    assert plain_weight is None
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-6)
    # Same seed, same data: the first batch meets the same model either way; only the loss weighs it differently.
    assert torch.equal(logits, weighted_logits) and torch.equal(target, weighted_target)
    nll = -torch.log_softmax(logits, dim=1)[torch.arange(len(target)), target]
    torch.testing.assert_close(plain_loss, nll.mean())
    per_clip = torch.tensor(expected, dtype=torch.float32)[target]
    torch.testing.assert_close(loss, (per_clip * nll).sum() / per_clip.sum())
    assert abs(float(loss) - float(plain_loss)) > 1e-3
    losses = [pd.read_csv(tmp_path / f"weighting-{w}" / "epochs.csv").train_loss.tolist() for w in (False, True)]
    assert losses[0] != losses[1]


def test_training_starts_each_clip_at_a_random_step_of_its_first_half_and_evaluation_at_its_first(both_signal):
    with open_features(both_signal / "train") as features:
        classes = list(features.attrs["classes"])
        steps = packed_in_memory(features, ("face",))
        training = ClipDataset(features, classes, train=True, inputs=("face",), steps=steps)
        evaluation = ClipDataset(features, classes, train=False, inputs=("face",), steps=steps)
        clips = [features[clip_id] for clip_id in features.clip_ids]
    torch.manual_seed(0)
    lengths_seen = set()
    for i, clip in enumerate(clips):
        # A clip's steps are its frames with a face (all its frames when none has one).
        steps = clip["face"][clip["has_face"]] if clip["has_face"].any() else clip["face"]
        for _ in range(3):
            assert np.array_equal(evaluation[i].inputs["face"], steps)
        starts = set()
        for _ in range(60):
            drawn = training[i].inputs["face"]
            start = len(steps) - len(drawn)
            assert np.array_equal(drawn, steps[start:])
            starts.add(start)
        # Each start is a step of the first half: 2 * start < length.
        assert starts == set(range((len(steps) + 1) // 2)), (len(steps), starts)
        lengths_seen.add(len(steps))
    assert {4, 5} <= lengths_seen  # an even and an odd length, where the half's bound differs


def test_training_needs_labelled_splits(both_signal, tmp_path):
    with pytest.raises(TrainError, match="no features for split 'nope'"):
        train_model(TrainConfig(model="face", features=both_signal, val_split="nope", out=tmp_path / "x", **CPU))


def test_preloading_maps_the_steps_cache_unless_told_never(both_signal):
    with open_features(both_signal / "train") as features:
        for choice in ("auto", "always"):
            steps = preloaded(features, choice, SEEN, "train", log=print)
            assert steps.folder is not None and set(steps.arrays) == set(SEEN)
        assert preloaded(features, "never", ("face",), "train", log=print) is None
        assert in_memory_bytes(features, ("face", "context")) == features.n_frames * (128 * 4 + 64 * 2)
        assert in_memory_bytes(features, ("face",)) == features.n_frames * 128 * 4
        assert in_memory_bytes(features, ("face_map",)) == features.n_frames * 128 * 4 * 4 * 2


@pytest.mark.parametrize("model", ["face", "context", "caca", "c3d", "audio", "caca-av"])
def test_a_model_trains_on_only_the_arrays_it_reads(both_signal, tmp_path, monkeypatch, model):
    read = set()
    original = FeatureSet.read

    def recording(self, clip_id, arrays=None):
        read.update(arrays)
        return original(self, clip_id, arrays)

    monkeypatch.setattr(FeatureSet, "read", recording)
    hears = model in AUDIO_MODELS
    features = write_planted_set(tmp_path / "voice", "voice", {"train": 16, "val": 8}) if hears else both_signal
    config = TrainConfig(model=model, features=features, out=tmp_path / "run", preload="never", epochs=1, **CPU)
    train_model(config, **QUIET)
    reads = {"face": ["face"], "context": ["context"], "c3d": ["face_map"], "audio": ["audio", "has_audio"],
             "caca-av": ["face", "context", "audio", "has_audio"]}
    assert read == {"has_face", *reads.get(model, ["face", "context"])}


def test_gzip_and_uncompressed_shards_give_identical_batches(both_signal, tmp_path):
    repack(both_signal / "train", tmp_path / "train", "none")
    batches = {}
    for name, folder in (("gzip", both_signal / "train"), ("none", tmp_path / "train")):
        with open_features(folder) as features:
            dataset = ClipDataset(features, list(features.attrs["classes"]), train=True, inputs=SEEN)
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
    assert train_model(config, **QUIET).accuracy > 0.9
