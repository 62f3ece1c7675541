"""Stage 1 end to end, as users run it: real clips, real weights, the CLI in a subprocess where the
process is the point (exit statuses, kill -9, Ctrl-C, workers, -v) and in this process otherwise."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from extract.embed import Networks
from extract.face_cnn import EXPRESSION_CLASSES, FaceCNN
from extract.clips import embed_clips, load_networks, recipe_of
from extract.settings import ExtractSettings, NetworkChoice
from features.reader import open_features
from features.schema import is_temp_name, shard_files
from features.tools import validate
from manifests.manifest import read_manifest
from outputs import is_temporary
from tests.cli_runs import one_line_error, run_cli
from tests.feature_files import assert_same_clips, read_all
from tests.media import ASTRONAUT_FACE_BOX, HEAD, moving_face, photo, write_clip, write_tone
from tests.threads import FRESH_PROCESS_THREADS, torch_threads

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
            "--context-backbone", "mobilenet_v2", "--device", "cpu", "--quiet", *extra]


def in_process(*args) -> tuple[int, str, str]:
    """The CLI in this process, computing as a CLI subprocess would."""
    with torch_threads(FRESH_PROCESS_THREADS):
        return run_cli(*args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, extraction_weights):
    root = tmp_path_factory.mktemp("dataset")
    make_dataset(root / "data")
    assert cli("manifest", "folder", "--root", str(root / "data"), "--out", str(root / "m.csv")).returncode == 0
    return root


# One clip a shard, so the reference's batches are those of the runs with other shard sizes
# compared with it (the networks then see the same frames in every call).
REFERENCE = ("--shard-size", "1")


@pytest.fixture(scope="module")
def first_run(dataset):
    return cli(*extract_args(dataset / "m.csv", dataset / "out", *REFERENCE))


def test_extract_writes_valid_shards_and_lists_exactly_the_broken_clips(dataset, first_run):
    assert first_run.returncode == 3, first_run.stderr
    assert "4 clips extracted, 0 already done, 3 failed" in first_run.stdout
    folder = dataset / "out" / "train"
    with open(folder / "failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert {row["clip_id"] for row in failures} == BROKEN
    assert all(row["stage"] == "decode" and row["path"] in row["error"] for row in failures)
    assert validate(folder) == []


def test_validate_exits_1_naming_the_damaged_shard_in_one_line(dataset, first_run, tmp_path):
    copy = shutil.copytree(dataset / "out" / "train", tmp_path / "train")
    damaged = copy / "shard-00003.h5"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # inside the first clip's compressed arrays
    damaged.write_bytes(bytes(data))
    done = cli("features", "validate", str(copy))
    assert done.returncode == 1 and "valid" not in done.stdout
    reported = [line for line in done.stderr.splitlines() if line and not line.startswith("validate:")]  # no bar
    assert len(reported) == 1 and reported[0].startswith(f"{damaged}: clip 'train/happy/a/001': unreadable"), done.stderr
    assert reported[0].endswith("the file is damaged")


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
    shards = {path.name: stamp(path) for path in shard_files(folder)}
    status, stdout, stderr = in_process(*extract_args(dataset / "m.csv", dataset / "out", *REFERENCE))
    assert status == 3, stderr
    assert "0 clips extracted, 4 already done, 3 failed (3 in an earlier run, files unchanged)" in stdout
    assert {path.name: stamp(path) for path in shard_files(folder)} == shards


@pytest.fixture(scope="module")
def verbose_val(dataset, first_run):
    """The val split extracted with -v beside the train split, so stage 2 can read both."""
    args = extract_args(dataset / "m.csv", dataset / "out")
    args[args.index("train")] = "val"
    return cli("-v", *args)


def test_verbose_says_what_each_clip_gave_and_quiet_says_nothing_more(first_run, verbose_val):
    assert "INFO" not in first_run.stderr
    assert verbose_val.returncode == 0, verbose_val.stderr
    assert "networks loaded on cpu" in verbose_val.stderr
    assert "val/happy/001: 4 frames sampled, a face in 4" in verbose_val.stderr, verbose_val.stderr


def test_bfloat16_features_say_so_and_are_not_mixed_with_float32(dataset, first_run):
    args = extract_args(dataset / "m.csv", dataset / "bfloat16")
    args[args.index("train")] = "val"
    assert in_process(*args, "--precision", "bfloat16")[0] == 0
    with open_features(dataset / "bfloat16" / "val") as features:
        assert features.attrs["precision"] == "bfloat16"
    one_line_error(*in_process(*args)[::2], "precision: 'bfloat16' != 'float32'")


def test_other_settings_are_refused_not_mixed(dataset, first_run):
    status, _, stderr = in_process(*extract_args(dataset / "m.csv", dataset / "out", "--fps", "10"))
    one_line_error(status, stderr, "fps: 5.0 != 10.0")


def stamp(path: Path) -> tuple[str, int]:
    """A file's bytes and modification time: a shard a run leaves alone keeps both."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temp_name(p.name) or is_temporary(p.name))


# An extract process that stops itself at an exact point of its work, whatever the machine's
# speed: a patched function sends the signal. argv: the point, then cli.py's arguments.
STOPPING_EXTRACT = """
import os, signal, sys
import cli
from extract import clips
from features import writer

point, args = sys.argv[1], sys.argv[2:]
calls = []
# Ctrl-C as in a shell's foreground job, even where the tests run in the background (which
# ignores SIGINT, and a child inherits that).
signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_at(call, signal_number=signal.SIGKILL):
    calls.append(None)
    if len(calls) == call:
        os.kill(os.getpid(), signal_number)


def decoding(real):  # in the first clip's third sampled frame, before any shard exists
    def sample_frames(*args, **kwargs):
        for frame in real(*args, **kwargs):
            stop_at(3)
            yield frame
    return sample_frames


def closed(real, call, signal_number):  # right after this run's call-th shard is renamed into place
    def close(self):
        path = real(self)
        stop_at(call, signal_number)
        return path
    return close


def synced(real):  # once this run's first shard is complete in its temporary file, before the rename
    def fsync_path(path):
        real(path)
        if writer.is_temp_name(path.name):
            stop_at(1)
    return fsync_path


if point == "decoding":
    clips.sample_frames = decoding(clips.sample_frames)
if point == "ctrl-c after a shard":
    writer.ShardWriter.close = closed(writer.ShardWriter.close, 1, signal.SIGINT)
if point == "between shards":
    writer.ShardWriter.close = closed(writer.ShardWriter.close, 2, signal.SIGKILL)
if point == "closing a shard":
    writer.fsync_path = synced(writer.fsync_path)
cli.cli(args, prog_name="cli.py")
"""


def stopped_at(point: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STOPPING_EXTRACT, point, *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_runs_stopped_at_every_point_resume_to_the_same_set(dataset, first_run, tmp_path):
    """Killed while decoding, interrupted (Ctrl-C) after a shard, killed between shards and while
    closing one, each run resuming the one before: finished shards are never redone nor touched,
    temporary files of killed writers go, and the set is the one-run set bit for bit."""
    args = extract_args(dataset / "m.csv", tmp_path, *REFERENCE)
    folder = tmp_path / "train"
    stored = lambda: {path.name: stamp(path) for path in shard_files(folder)}  # noqa: E731
    clips = lambda: sorted(read_all(folder)) if stored() else []  # noqa: E731

    assert stopped_at("decoding", *args).returncode == -signal.SIGKILL
    assert stored() == {} and temporary_files(folder) == []

    interrupted = stopped_at("ctrl-c after a shard", *args)
    assert (interrupted.returncode, interrupted.stderr) == (130, "interrupted\n"), interrupted.stderr
    assert clips() == ["train/happy/a/001"] and temporary_files(folder) == []
    left = stored()

    killed = stopped_at("between shards", "-v", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "7 clips in the split, 1 done earlier, 0 failed earlier with unchanged files; 6 to extract" in killed.stderr
    assert stored().items() >= left.items(), "shards in place are never rewritten"
    assert clips() == ["train/happy/a/001", "train/happy/b/001", "train/neutral/cat"]
    left = stored()

    killed = stopped_at("closing a shard", "-v", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "7 clips in the split, 3 done earlier, 0 failed earlier with unchanged files; 4 to extract" in killed.stderr
    assert stored() == left and len(temporary_files(folder)) == 1, "a complete temporary file, never renamed"

    status, stdout, stderr = in_process(*args)
    assert status == 3, stderr
    assert "1 clips extracted, 3 already done, 3 failed;" in stdout
    assert stored().items() >= left.items() and temporary_files(folder) == []
    assert validate(folder) == []
    assert_same_clips(read_all(folder), read_all(dataset / "out" / "train"))


# cli.py whose local workers' tasks meet at a barrier: a worker that has extracted a clip waits
# until another process has too, so two workers extract clips however loaded the machine is (else
# one worker may take every task before the other has imported torch). Waiting ends BARRIER_S after
# the start, so a run with one worker fails the test instead of hanging it. argv: the barrier's
# folder, then cli.py's arguments.
TWO_WORKERS_EXTRACT = """
import os, sys, time
from pathlib import Path
import cli
from extract import pipeline

BARRIER_S = 120
barrier, args = Path(sys.argv[1]), sys.argv[2:]
deadline = time.time() + BARRIER_S
shard_task = pipeline._shard_task


def met_by_two_workers(barrier, deadline, task, *task_args):  # defined in __main__: sent to the worker by value
    summary = task(*task_args)
    if summary.done:
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.05)
    return summary


def behind_the_barrier(*args):
    task, task_args, kwargs = shard_task(*args)
    return met_by_two_workers, (barrier, deadline, task, *task_args), kwargs


pipeline._shard_task = behind_the_barrier
cli.cli(args, prog_name="cli.py")
"""


def test_two_workers_split_the_threads_and_give_one_process_features(dataset, first_run, tmp_path):
    out = dataset / "workers"
    args = extract_args(dataset / "m.csv", out, "--workers", "2", *REFERENCE)
    run = subprocess.Popen([sys.executable, "-c", TWO_WORKERS_EXTRACT, str(tmp_path), "-v", *args], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = run.communicate()
    assert run.returncode == 3, stderr
    assert "4 clips extracted, 0 already done, 3 failed" in stdout
    # Each worker logs each shard it wrote (or its failed clips) with its process and torch threads.
    tasks = re.findall(r": (\d) clips, .* \(process (\d+), torch threads (\d+)\)", stderr)
    assert sorted(clips for clips, _, _ in tasks) == ["0"] * 3 + ["1"] * 4, stderr
    pids = {pid for _, pid, _ in tasks}
    assert len(pids) == 2 and str(run.pid) not in pids, "tasks run in the two worker processes"
    assert {pid for clips, pid, _ in tasks if clips == "1"} == pids, "each worker wrote a shard"
    assert {path.name for path in tmp_path.iterdir()} == pids, "both workers met at the barrier"
    assert "7 to extract with 2 worker(s)" in stderr
    split = max(1, (os.cpu_count() or 1) // 2)
    assert {int(threads) for _, _, threads in tasks} == {split}, "the cores split between the workers"
    assert stderr.count("networks loaded on cpu") == 2, "once in each worker"
    assert "train/sad/portrait: 6 frames sampled, a face in 6" in stderr, "-v shows the workers' clips"
    # The features of one process computing on a worker's threads, bit for bit.
    with torch_threads(split):
        assert run_cli(*extract_args(dataset / "m.csv", dataset / "split-threads", *REFERENCE))[0] == 3
    assert_same_clips(read_all(out / "train"), read_all(dataset / "split-threads" / "train"))


def test_batches_across_clips_do_not_change_the_features(dataset, weight_path):
    """A batch smaller than a clip, and one spanning several clips, give the same arrays."""
    entries = [e for e in read_manifest(dataset / "m.csv", split="train") if e.clip_id.startswith("train/happy")]
    settings = ExtractSettings(split="train", manifest=dataset / "m.csv", context_backbone="mobilenet_v2", device="cpu")
    recipe = recipe_of(settings)
    networks: Networks = load_networks(NetworkChoice.of(recipe, "cpu"))
    small, large = (list(embed_clips(entries, networks, recipe, size)) for size in (3, 64))
    for a, b in zip(small, large):
        assert a.clip_id == b.clip_id
        np.testing.assert_allclose(a.face, b.face, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a.context, b.context, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(a.has_face, b.has_face)


def test_stored_face_crops_show_the_main_face(dataset, weight_path):
    out = dataset / "crops"
    status, _, stderr = in_process(*extract_args(dataset / "m.csv", out, "--save-crops"))
    assert status == 3, stderr
    assert validate(out / "train") == []
    clips = read_all(out / "train")
    crops = clips["train/happy/a/001"]["face_crop"]
    assert crops.shape == (10, 128, 128, 3) and crops.dtype == np.uint8
    expressions = FaceCNN(weight_path("mini-xception-fer2013"), device="cpu").expressions(crops)
    assert {EXPRESSION_CLASSES[int(i)] for i in expressions.argmax(dim=1)} == {"happy"}
    assert not clips["train/neutral/cat"]["face_crop"].any()


def test_a_missing_file_is_reported_up_front_then_recorded_as_a_failure(dataset, first_run):
    manifest = dataset / "with-missing.csv"
    manifest.write_text((dataset / "m.csv").read_text() + "train/happy/gone,data/train/happy/gone.mp4,happy,train\n")
    status, _, stderr = in_process(*extract_args(manifest, dataset / "missing"))
    assert status == 3
    assert "1 of 8 clips are missing" in stderr and "line 10: clip 'train/happy/gone'" in stderr
    with open(dataset / "missing" / "train" / "failures.csv", newline="") as f:
        assert {row["clip_id"] for row in csv.DictReader(f)} == BROKEN | {"train/happy/gone"}


def test_a_manifest_whose_files_are_all_missing_stops_before_any_work(dataset, tmp_path):
    manifest = tmp_path / "elsewhere.csv"
    manifest.write_text((dataset / "m.csv").read_text())
    status, _, stderr = run_cli(*extract_args(manifest, tmp_path / "out"))
    assert status == 1 and "none of the 7 files of split 'train' exists" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out" / "train").exists()


def test_extracted_features_train_and_evaluate(dataset, first_run, verbose_val, tmp_path):
    """Stage 1's files feed stage 2 as they are: the train and val splits extracted, train, evaluate."""
    assert verbose_val.returncode == 0, verbose_val.stderr
    run = tmp_path / "run"
    status, _, stderr = run_cli("train", "--model", "caca", "--features", dataset / "out", "--epochs", 2, "--out", run,
                                "--device", "cpu")
    assert status == 0, stderr
    status, stdout, stderr = run_cli("evaluate", "--run", run, "--split", "train", "--device", "cpu")
    assert status == 0, stderr
    assert "(4 clips)" in stdout and (run / "eval-train" / "confusion.png").exists()
