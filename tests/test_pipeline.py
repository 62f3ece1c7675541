"""Stage 1 end to end, as users run it: real clips, the CLI in a subprocess, real weights."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract.embed import Networks
from extract.face_cnn import EXPRESSION_CLASSES, FaceCNN
from extract.pipeline import ExtractSettings, embed_clips, load_networks
from features import open_features
from manifests.manifest import read_manifest
from tests.media import ASTRONAUT_FACE_BOX, HEAD, moving_face, photo, write_clip, write_tone

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {"train/angry/empty", "train/angry/notes", "train/angry/tone"}


def make_dataset(root: Path) -> None:
    clips = {
        "train/happy/a/001.mp4": dict(frames=moving_face("coffee")),
        "train/happy/b/001.mp4": dict(frames=moving_face("rocket", frames=40)),
        # Stored sideways with display rotation, as phones record portrait video.
        "train/sad/portrait.mp4": dict(frames=[np.rot90(f).copy() for f in moving_face("coffee", 30)], clockwise=90),
        "train/neutral/cat.mp4": dict(frames=[photo("chelsea")] * 30),
        "val/happy/001.mp4": dict(frames=moving_face("rocket", frames=20)),
    }
    for rel, spec in clips.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / rel, spec["frames"], clockwise=spec.get("clockwise", 0))
    (root / "train/angry").mkdir(parents=True)
    (root / "train/angry/empty.mp4").write_bytes(b"")
    (root / "train/angry/notes.mp4").write_text("not a video")
    write_tone(root / "train/angry/tone.mkv")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True)


def extract_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--manifest", str(manifest), "--split", "train", "--out", str(out),
            "--context-backbone", "mobilenet_v2", "--quiet", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, weight_path):
    for name in ("retinaface-mobilenet0.25", "mini-xception-fer2013", "mobilenetv2-imagenet"):
        weight_path(name)
    root = tmp_path_factory.mktemp("dataset")
    make_dataset(root / "data")
    assert cli("manifest", "folder", "--root", str(root / "data"), "--out", str(root / "m.csv")).returncode == 0
    return root


@pytest.fixture(scope="module")
def first_run(dataset):
    return cli(*extract_args(dataset / "m.csv", dataset / "out"))


def read_all(folder: Path) -> dict[str, dict]:
    with open_features(folder) as features:
        return {clip_id: features[clip_id] for clip_id in features.clip_ids}


def test_extract_writes_valid_shards_and_lists_exactly_the_broken_clips(dataset, first_run):
    assert first_run.returncode == 3, first_run.stderr
    assert "4 clips extracted, 0 already done, 3 failed" in first_run.stdout
    folder = dataset / "out" / "train"
    with open(folder / "failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert {row["clip_id"] for row in failures} == BROKEN
    assert all(row["stage"] == "decode" and row["path"] in row["error"] for row in failures)
    validated = cli("features", "validate", str(folder))
    assert validated.returncode == 0, validated.stderr


def test_extracted_clips_hold_what_the_videos_show(dataset, first_run):
    clips = read_all(dataset / "out" / "train")
    assert sorted(clips) == ["train/happy/a/001", "train/happy/b/001", "train/neutral/cat", "train/sad/portrait"]
    moving = clips["train/happy/a/001"]
    np.testing.assert_allclose(moving["timestamps"], np.arange(10) * 0.2, atol=1e-3)
    assert moving["label"] == "happy" and moving["has_face"].all() and (moving["score"] > 0.9).all()
    # 25 fps source, 5 fps samples: the head moves 5 * 4 px between samples.
    face_x = ASTRONAUT_FACE_BOX[0] - HEAD[1].start + 40
    np.testing.assert_allclose(moving["box"][:, 0], face_x + 20 * np.arange(10), atol=12)
    assert moving["face"].shape == (10, 128) and moving["face_map"].shape == (10, 128, 4, 4)
    assert moving["context"].shape == (10, 1280)
    cat = clips["train/neutral/cat"]
    assert not cat["has_face"].any() and np.isnan(cat["box"]).all() and not cat["face"].any()
    portrait = clips["train/sad/portrait"]
    assert portrait["has_face"].all(), "the rotated clip must be decoded upright for the face to be found"
    assert (portrait["box"][:, 3] > portrait["box"][:, 1]).all()


def test_a_second_run_does_nothing(dataset, first_run):
    folder = dataset / "out" / "train"
    shards = sorted(folder.glob("*.h5"))
    again = cli(*extract_args(dataset / "m.csv", dataset / "out"))
    assert again.returncode == 3
    assert "0 clips extracted, 4 already done, 3 failed (3 in an earlier run, files unchanged)" in again.stdout
    assert sorted(folder.glob("*.h5")) == shards


def test_verbose_says_what_each_clip_gave_and_quiet_says_nothing_more(dataset, first_run):
    assert "INFO" not in first_run.stderr
    args = extract_args(dataset / "m.csv", dataset / "verbose")
    args[args.index("train")] = "val"
    done = cli("-v", *args)
    assert done.returncode == 0, done.stderr
    assert "networks loaded on cpu" in done.stderr
    assert "val/happy/001: 4 frames sampled, a face in 4" in done.stderr, done.stderr


def test_bfloat16_features_say_so_and_are_not_mixed_with_float32(dataset, first_run):
    args = extract_args(dataset / "m.csv", dataset / "bfloat16")
    args[args.index("train")] = "val"
    assert cli(*args, "--precision", "bfloat16").returncode == 0
    with open_features(dataset / "bfloat16" / "val") as features:
        assert features.attrs["precision"] == "bfloat16"
    again = cli(*args)
    assert again.returncode == 1 and "precision: 'bfloat16' != 'float32'" in again.stderr


def test_other_settings_are_refused_not_mixed(dataset, first_run):
    other = cli(*extract_args(dataset / "m.csv", dataset / "out", "--fps", "10"))
    assert other.returncode == 1
    assert "fps: 5.0 != 10.0" in other.stderr and "Traceback" not in other.stderr


def test_a_run_killed_mid_way_resumes_to_the_same_clips(dataset, first_run):
    out = dataset / "killed"
    args = [sys.executable, "cli.py", *extract_args(dataset / "m.csv", out, "--shard-size", "1")]
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((out / "train").glob("shard-*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert 1 <= len(list((out / "train").glob("shard-*.h5"))) < 4, "kill came too late to test resuming"
    resumed = cli(*extract_args(dataset / "m.csv", out, "--shard-size", "1"))
    assert resumed.returncode == 3
    assert cli("features", "validate", str(out / "train")).returncode == 0
    reference, result = read_all(dataset / "out" / "train"), read_all(out / "train")
    assert sorted(result) == sorted(reference)
    for clip_id, arrays in reference.items():
        for name in ("face", "context", "box", "has_face", "timestamps"):
            np.testing.assert_allclose(result[clip_id][name], arrays[name], rtol=1e-3, atol=2e-3, err_msg=clip_id)


def test_two_workers_give_the_same_features(dataset, first_run):
    out = dataset / "workers"
    done = cli(*extract_args(dataset / "m.csv", out, "--workers", "2", "--shard-size", "2"))
    assert done.returncode == 3, done.stderr
    reference, result = read_all(dataset / "out" / "train"), read_all(out / "train")
    assert sorted(result) == sorted(reference)
    for clip_id, arrays in reference.items():
        np.testing.assert_allclose(result[clip_id]["face"], arrays["face"], rtol=1e-3, atol=2e-3)


def test_batches_across_clips_do_not_change_the_features(dataset, weight_path):
    """A batch smaller than a clip, and one spanning several clips, give the same arrays."""
    entries = [e for e in read_manifest(dataset / "m.csv", split="train") if e.clip_id.startswith("train/happy")]
    settings = ExtractSettings(split="train", manifest=dataset / "m.csv", context_backbone="mobilenet_v2", device="cpu")
    networks: Networks = load_networks(settings)
    small, large = (
        list(embed_clips(entries, networks, ExtractSettings(**{**settings.__dict__, "batch_size": size})))
        for size in (3, 64)
    )
    for a, b in zip(small, large):
        assert a.clip_id == b.clip_id
        np.testing.assert_allclose(a.face, b.face, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.context, b.context, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a.has_face, b.has_face)


def test_stored_face_crops_show_the_main_face(dataset, weight_path):
    out = dataset / "crops"
    done = cli(*extract_args(dataset / "m.csv", out, "--save-crops"))
    assert done.returncode == 3, done.stderr
    assert cli("features", "validate", str(out / "train")).returncode == 0
    clips = read_all(out / "train")
    crops = clips["train/happy/a/001"]["face_crop"]
    assert crops.shape == (10, 128, 128, 3) and crops.dtype == np.uint8
    expressions = FaceCNN(weight_path("mini-xception-fer2013"), device="cpu").expressions(crops)
    assert {EXPRESSION_CLASSES[int(i)] for i in expressions.argmax(dim=1)} == {"happy"}
    assert not clips["train/neutral/cat"]["face_crop"].any()


def test_a_missing_file_is_reported_up_front_then_recorded_as_a_failure(dataset, first_run):
    manifest = dataset / "with-missing.csv"
    manifest.write_text((dataset / "m.csv").read_text() + "train/happy/gone,data/train/happy/gone.mp4,happy,train\n")
    done = cli(*extract_args(manifest, dataset / "missing"))
    assert done.returncode == 3
    assert "1 of 8 clips are missing" in done.stderr and "line 10: clip 'train/happy/gone'" in done.stderr
    with open(dataset / "missing" / "train" / "failures.csv", newline="") as f:
        assert {row["clip_id"] for row in csv.DictReader(f)} == BROKEN | {"train/happy/gone"}


def test_a_manifest_whose_files_are_all_missing_stops_before_any_work(dataset, tmp_path):
    manifest = tmp_path / "elsewhere.csv"
    manifest.write_text((dataset / "m.csv").read_text())
    done = cli(*extract_args(manifest, tmp_path / "out"))
    assert done.returncode == 1 and "none of the 7 files of split 'train' exists" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "train").exists()


def test_extracted_features_train_and_evaluate(dataset, first_run, tmp_path):
    """Stage 1's files feed stage 2 as they are: extract the val split, train, evaluate."""
    val = cli("extract", "--manifest", str(dataset / "m.csv"), "--split", "val", "--out", str(dataset / "out"),
              "--context-backbone", "mobilenet_v2", "--quiet")
    assert val.returncode == 0, val.stderr
    run = tmp_path / "run"
    trained = cli("train", "--model", "caca", "--features", str(dataset / "out"), "--epochs", "2", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    evaluated = cli("evaluate", "--run", str(run), "--split", "train")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "(4 clips)" in evaluated.stdout and (run / "eval-train" / "confusion.png").exists()
