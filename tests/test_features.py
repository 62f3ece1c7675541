"""The feature-file format: round trips, atomic shards, the index, fork safety, validation, merge, inspect."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from features.reader import open_features, write_index
from features.recipe import MAX_CONTEXT_DIM
from features.schema import NO_TRACK, AudioTrack, ClipFeatures, FeatureFileError, comparable
from features.writer import ShardWriter
from features.labels import CHEAVD_CLASSES
from features.recipe import RECIPE_ATTRS, SETTING_DEFAULTS, FeatureRecipe
from features.schema import (
    COMPRESSIONS, FRAME_ARRAY_NAMES, INDEX_NAME, content_sha256, shard_name, temp_files,
)
from features.tools import WARNING, AudioSummary, inspect, inspect_summary, merge, repack, validate
from features import reader, tools, writer
from tests.feature_files import extractor_attrs as shared_extractor_attrs

REPO = Path(__file__).resolve().parents[1]
CONTEXT_DIM = 24


def extractor_attrs(**changes) -> dict:
    return shared_extractor_attrs(**{"context_dim": CONTEXT_DIM, **changes})


def make_clip(clip_id: str, frames: int, label: str = "happy", seed: int = 0) -> ClipFeatures:
    """A clip with smooth-ish values and some frames without a face (filler per the policy)."""
    rng = np.random.default_rng(seed)
    has_face = rng.random(frames) > 0.3
    has_face[0] = True
    box = (np.array([100, 50, 200, 170]) + rng.normal(0, 2, (frames, 4))).astype(np.float32)
    landmarks = (rng.uniform(100, 200, (frames, 5, 2))).astype(np.float32)
    face = rng.normal(0, 1, (frames, 128)).astype(np.float32)
    face_map = rng.normal(0, 1, (frames, 128, 4, 4)).astype(np.float16)
    score = rng.uniform(0.6, 1.0, frames).astype(np.float32)
    absent = ~has_face
    face[absent], face_map[absent], score[absent], box[absent], landmarks[absent] = 0, 0, 0, np.nan, np.nan
    return ClipFeatures(
        clip_id=clip_id,
        label=label,
        source_path=f"videos/{clip_id}.mp4",
        source_fps=25.0,
        duration=frames / 5.0,
        timestamps=np.arange(frames) * 0.2 + 0.02,
        has_face=has_face,
        face=face,
        face_map=face_map,
        context=np.maximum(rng.normal(0, 1, (frames, CONTEXT_DIM)), 0).astype(np.float16),
        box=box,
        score=score,
        landmarks=landmarks,
    )


def write_shard(folder: Path, number: int, clips: list[ClipFeatures], **kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    attrs = kwargs.pop("attrs", extractor_attrs())
    with ShardWriter(folder / shard_name(number), attrs, **kwargs) as writer:
        for clip in clips:
            writer.add_clip(clip)
    return folder / shard_name(number)


def assert_same_clip(read: dict, clip: ClipFeatures) -> None:
    for name in FRAME_ARRAY_NAMES:
        expected = getattr(clip, name)
        assert read[name].shape == expected.shape, name
        np.testing.assert_array_equal(read[name], expected, err_msg=name)
    assert read["clip_id"] == clip.clip_id
    assert read["label"] == (clip.label or None)
    scalars = (read["source_path"], read["source_fps"], read["duration"])
    assert scalars == (clip.source_path, clip.source_fps, clip.duration)


def three_shards(folder: Path) -> list[list[ClipFeatures]]:
    shards = [
        [make_clip("a1", 1, seed=1), make_clip("a2", 7, "sad", seed=2), make_clip("a3", 30, "", seed=3)],
        [make_clip("b1", 12, "neutral", seed=4)],
        [make_clip("c1", 5, "anxious", seed=5), make_clip("c2", 9, "happy", seed=6)],
    ]
    for number, clips in enumerate(shards):
        write_shard(folder, number, clips)
    write_index(folder)
    return shards


def test_round_trip_of_three_shards_reads_back_exact_arrays(tmp_path):
    shards = three_shards(tmp_path)
    clips = [clip for shard in shards for clip in shard]
    with open_features(tmp_path) as features:
        assert features.clip_ids == [clip.clip_id for clip in clips]
        assert len(features) == 6 and "b1" in features and "zz" not in features
        assert features.labels == {clip.clip_id: clip.label or None for clip in clips}
        assert features.attrs["context_dim"] == CONTEXT_DIM and features.attrs["context_dtype"] == "float16"
        assert features.attrs["normalisation"] == extractor_attrs()["normalisation"]
        assert features.attrs["classes"] == list(CHEAVD_CLASSES)
        for clip in reversed(clips):
            read = features[clip.clip_id]
            assert_same_clip(read, clip)
            assert read["context"].dtype == np.float16 and read["face_map"].dtype == np.float16
            assert read["face"].dtype == np.float32 and read["has_face"].dtype == bool
    with open_features(tmp_path / shard_name(1)) as one_shard:
        assert one_shard.clip_ids == ["b1"]
        assert_same_clip(one_shard["b1"], shards[1][0])
    assert validate(tmp_path) == []


def test_reading_some_arrays_gives_exactly_those_of_the_full_read(tmp_path):
    three_shards(tmp_path)
    chosen = ("face", "context", "has_face")
    with open_features(tmp_path) as features:
        for clip_id in features.clip_ids:
            full, some = features[clip_id], features.read(clip_id, arrays=chosen)
            assert set(some) == set(chosen) | {"clip_id", "label", "source_path", "source_fps", "duration"}
            for name in chosen:
                assert some[name].dtype == full[name].dtype
                np.testing.assert_array_equal(some[name], full[name])
            assert all(some[key] == full[key] for key in ("clip_id", "label", "source_path", "source_fps", "duration"))
        with pytest.raises(KeyError, match="face_crop"):
            features.read("a1", arrays=("face", "face_crop"))


def test_context_can_be_stored_as_float32(tmp_path):
    clip = make_clip("x", 4)
    clip = dataclasses.replace(clip, context=clip.context.astype(np.float32) + 1e-4)
    write_shard(tmp_path, 0, [clip], context_dtype="float32")
    with open_features(tmp_path) as features:
        assert features.attrs["context_dtype"] == "float32"
        np.testing.assert_array_equal(features["x"]["context"], clip.context)


def with_crops(clip: ClipFeatures) -> ClipFeatures:
    crops = np.random.default_rng(1).integers(1, 256, (len(clip.timestamps), 128, 128, 3), dtype=np.uint8)
    crops[~clip.has_face] = 0
    return dataclasses.replace(clip, face_crop=crops)


def test_face_crops_are_stored_only_on_request(tmp_path):
    clip = with_crops(make_clip("x", 6))
    write_shard(tmp_path / "with", 0, [clip], store_face_crops=True)
    write_shard(tmp_path / "without", 0, [make_clip("y", 6)])
    with open_features(tmp_path / "with") as features:
        assert features.attrs["face_crops_stored"] is True
        np.testing.assert_array_equal(features["x"]["face_crop"], clip.face_crop)
    with open_features(tmp_path / "without") as features:
        assert features.attrs["face_crops_stored"] is False and "face_crop" not in features["y"]
    write_index(tmp_path / "with")
    assert validate(tmp_path / "with") == []
    with pytest.raises(ValueError, match="no face_crop"):
        write_shard(tmp_path / "missing", 0, [make_clip("z", 3)], store_face_crops=True)
    leaking = dataclasses.replace(clip, face_crop=np.full_like(clip.face_crop, 7))
    with pytest.raises(ValueError, match="face_crop is not all zero"):
        write_shard(tmp_path / "leak", 0, [leaking], store_face_crops=True)


def test_a_clip_is_one_slice_of_each_dataset_of_its_shard(tmp_path):
    clips = [make_clip("p", 3, seed=1), make_clip("q", 11, seed=2), make_clip("r", 4, seed=3)]
    path = write_shard(tmp_path, 0, clips)
    with h5py.File(path, "r") as handle:
        starts, lengths = handle["clips/start"][()], handle["clips/length"][()]
        assert starts.tolist() == [0, 3, 14] and lengths.tolist() == [3, 11, 4]
        assert handle["clips/clip_id"].asstr()[()].tolist() == ["p", "q", "r"]
        for name in FRAME_ARRAY_NAMES:
            assert handle[f"frames/{name}"].shape[0] == 18 and handle[f"frames/{name}"].maxshape[0] is None
        for clip, start, length in zip(clips, starts, lengths):
            for name in FRAME_ARRAY_NAMES:
                np.testing.assert_array_equal(handle[f"frames/{name}"][start : start + length], getattr(clip, name))


def test_a_writer_whose_body_raises_leaves_no_file_at_all(tmp_path):
    with pytest.raises(RuntimeError, match="extraction failed"):
        with ShardWriter(tmp_path / shard_name(0), extractor_attrs()) as writer:
            writer.add_clip(make_clip("a", 5))
            raise RuntimeError("extraction failed")
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import os, sys
sys.path.insert(0, sys.argv[1])
from features.writer import ShardWriter
from tests.test_features import extractor_attrs, make_clip
writer = ShardWriter(sys.argv[2], extractor_attrs())
writer.add_clip(make_clip("lost", 6))
os._exit(1)
"""


def test_a_killed_writer_leaves_a_temp_file_readers_ignore_and_validate_reports(tmp_path):
    write_shard(tmp_path, 0, [make_clip("kept", 4)])
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(REPO), str(tmp_path / shard_name(1))])
    assert killed.returncode == 1
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(f".{shard_name(1)}.tmp-")]
    assert len(temps) == 1 and not (tmp_path / shard_name(1)).exists()
    write_index(tmp_path)
    with open_features(tmp_path) as features:
        assert features.clip_ids == ["kept"]
    problems = validate(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(WARNING) and str(temps[0]) in problems[0]


def test_one_writer_per_folder_and_the_file_systems_without_locks_name_the_switch(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    with writer.only_writer(folder):
        with pytest.raises(FeatureFileError, match=f"another extract or repack is writing into {folder}"):
            with writer.only_writer(folder):
                pass

    def refuse(file, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # what NFS without lockd answers

    monkeypatch.setattr(writer.fcntl, "flock", refuse)
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    with pytest.raises(FeatureFileError, match="refuses file locks .* set HDF5_USE_FILE_LOCKING=FALSE"):
        with writer.only_writer(folder):
            pass
    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")
    with writer.only_writer(folder):
        pass


def test_the_one_writer_removes_every_temporary_file_killed_writers_left_and_nothing_else(tmp_path):
    """A kill while a shard, the index or the failures file was being written leaves its
    temporary file; the next writer of the folder removes them, and only them."""
    folder = tmp_path / "out"
    killed = [f".{shard_name(0)}.tmp-123-beef", ".index.json.beef.part", ".failures.csv.cafe.part",
              ".index.json.k2x9_3"]  # the last named as indexes were before every write was alike
    kept = [shard_name(1), "index.json", "failures.csv", ".hidden", "notes.part"]
    folder.mkdir()
    for name in killed + kept:
        (folder / name).write_text("x")
    (folder / ".shard.part").mkdir()  # not a file any writer makes
    with writer.only_writer(folder):
        left = {p.name for p in folder.iterdir()}
    assert left == {*kept, ".shard.part", writer.WRITER_LOCK_FILE}
    assert all(writer.writes_into_set(name) for name in killed)


def test_a_stale_or_missing_index_falls_back_to_the_shard_files(tmp_path):
    three_shards(tmp_path)
    write_shard(tmp_path, 3, [make_clip("d1", 3)])  # written after the index
    with open_features(tmp_path) as features:
        assert features.clip_ids[-1] == "d1" and len(features) == 7
    assert any("does not list" in p and shard_name(3) in p for p in validate(tmp_path))

    (tmp_path / shard_name(0)).unlink()  # listed in the index, now gone
    with open_features(tmp_path) as features:
        assert features.clip_ids == ["b1", "c1", "c2", "d1"]
        assert_same_clip(features["d1"], make_clip("d1", 3))
    assert any("which does not exist" in p and shard_name(0) in p for p in validate(tmp_path))

    (tmp_path / INDEX_NAME).write_text("{ truncated")
    assert len(open_features(tmp_path)) == 4
    (tmp_path / INDEX_NAME).unlink()
    assert len(open_features(tmp_path)) == 4
    write_index(tmp_path)
    assert validate(tmp_path) == []


def open_shards_of_this_process(folder: Path) -> set[str]:
    fds = Path("/proc/self/fd")
    targets = {os.path.realpath(fd) for fd in fds.iterdir() if fd.is_symlink()}
    return {Path(t).name for t in targets if Path(t).parent == folder.resolve()}


def test_an_index_the_shards_vouch_for_spares_reading_clip_tables_and_no_shard_stays_open(tmp_path, monkeypatch):
    three_shards(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [entry["path"] for entry in index["shards"]] == [shard_name(n) for n in range(3)]
    assert index["shards"][0]["clips"]["clip_id"] == ["a1", "a2", "a3"]
    with h5py.File(tmp_path / shard_name(0), "r") as shard:
        assert index["shards"][0]["attrs"]["content_sha256"] == shard.attrs["content_sha256"]
    tables_read = []
    monkeypatch.setattr(reader, "read_clip_table", lambda handle, attrs: tables_read.append(handle.filename))
    features = open_features(tmp_path)
    assert tables_read == [] and features.clip_ids[:3] == ["a1", "a2", "a3"] and features.labels["a3"] is None
    assert open_shards_of_this_process(tmp_path) == set()
    assert_same_clip(features["b1"], make_clip("b1", 12, "neutral", seed=4))
    assert open_shards_of_this_process(tmp_path) == {shard_name(1)}
    features.close()
    assert open_shards_of_this_process(tmp_path) == set()
    # Every shard is still opened and checked: a damaged one is refused even with a vouching index.
    damaged = tmp_path / shard_name(0)
    with open(damaged, "r+b") as raw:
        raw.write(b"\0" * 8)
    with pytest.raises(FeatureFileError, match=f"{damaged}: cannot be opened as HDF5"):
        open_features(tmp_path)


def test_incomparable_shards_are_refused_naming_both_files_and_the_keys(tmp_path):
    first = write_shard(tmp_path, 0, [make_clip("a", 3)])
    second = write_shard(tmp_path, 1, [make_clip("b", 3)], attrs=extractor_attrs(fps=10.0), context_dtype="float32")
    with pytest.raises(FeatureFileError) as err:
        open_features(tmp_path)
    message = str(err.value)
    assert str(first) in message and str(second) in message
    assert "fps: 5.0 != 10.0" in message and "context_dtype: 'float16' != 'float32'" in message
    with pytest.raises(FeatureFileError, match="fps"):
        write_index(tmp_path)
    assert any("cannot be mixed" in p for p in validate(tmp_path))
    assert comparable(extractor_attrs(), extractor_attrs(split="val", manifest="other.csv")) == []


def test_a_recipe_round_trips_through_the_attributes_of_a_shard(tmp_path):
    with open_features(write_shard(tmp_path, 0, [make_clip("a", 3)], context_dtype="float32")) as features:
        stored = features.attrs
    recipe = FeatureRecipe.from_attrs(stored)
    assert recipe.to_attrs() == {key: stored[key] for key in RECIPE_ATTRS} and recipe.context_dtype == "float32"
    assert FeatureRecipe.from_attrs(recipe.to_attrs()) == recipe
    older = {key: value for key, value in stored.items() if key not in SETTING_DEFAULTS}
    assert FeatureRecipe.from_attrs(older).to_attrs() == {**recipe.to_attrs(), **SETTING_DEFAULTS}
    assert FeatureRecipe.from_attrs({**stored, "fps": 10.0}).differences(recipe) == ["fps: 10.0 != 5.0"]
    with pytest.raises(ValueError, match="attributes missing: fps, context_dim"):
        FeatureRecipe.from_attrs({key: value for key, value in stored.items() if key not in ("fps", "context_dim")})


def test_shards_older_than_a_setting_count_as_made_with_its_default(tmp_path):
    older = extractor_attrs()
    del older["precision"]
    assert comparable(older, extractor_attrs(precision="float32")) == []
    assert comparable(older, extractor_attrs(precision="bfloat16")) == ["precision: 'float32' != 'bfloat16'"]
    with h5py.File(write_shard(tmp_path, 0, [make_clip("a", 3)]), "r+") as shard:
        del shard.attrs["precision"]
    with pytest.raises(FeatureFileError, match="content_sha256 does not match .* changed after it was written"):
        write_index(tmp_path)
    with h5py.File(tmp_path / shard_name(0), "r+") as shard:  # older shards have no content hash either
        del shard.attrs["content_sha256"]
    write_index(tmp_path)
    assert validate(tmp_path) == []


class ClipDataset(torch.utils.data.Dataset):
    def __init__(self, features):
        self.features = features

    def __len__(self):
        return len(self.features)

    def __getitem__(self, i):
        clip = self.features[self.features.clip_ids[i]]
        return (i, os.getpid(), torch.from_numpy(clip["face"]), torch.from_numpy(clip["context"].astype(np.float32)),
                torch.from_numpy(clip["has_face"]))


def test_two_forked_dataloader_workers_read_what_the_parent_reads(tmp_path):
    three_shards(tmp_path)
    features = open_features(tmp_path)
    direct = {clip_id: features[clip_id] for clip_id in features.clip_ids}  # the parent now holds open handles
    loader = torch.utils.data.DataLoader(
        ClipDataset(features), batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    pids = set()
    for i, pid, face, context, has_face in loader:
        clip = direct[features.clip_ids[i]]
        np.testing.assert_array_equal(has_face.numpy(), clip["has_face"])
        np.testing.assert_array_equal(face.numpy(), clip["face"])
        np.testing.assert_array_equal(context.numpy(), clip["context"].astype(np.float32))
        pids.add(int(pid))
    assert len(pids) == 2 and os.getpid() not in pids
    np.testing.assert_array_equal(features["c2"]["context"], direct["c2"]["context"])  # the parent's handles still work
    clone = pickle.loads(pickle.dumps(features))  # what a spawned worker receives
    assert_same_clip(clone["a3"], make_clip("a3", 30, "", seed=3))
    features.close()


HOLD_EXCLUSIVE_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "rb") as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # the call HDF5 makes to lock a file
    print("locked", flush=True)
    time.sleep(60)
"""


def test_shards_locked_by_another_process_are_still_read(tmp_path, monkeypatch):
    """What NFS and Lustre without locks need: readers take no HDF5 file lock at all."""
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)  # it would override locking=False
    clips = three_shards(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_EXCLUSIVE_LOCK, str(tmp_path / shard_name(0))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OSError, match="unable to lock file"):  # HDF5's default sees the lock
            h5py.File(tmp_path / shard_name(0), "r")
        with open_features(tmp_path / shard_name(0)) as features:  # a shard alone: no index to lean on
            assert_same_clip(features["a2"], clips[0][1])
        with open_features(tmp_path) as features:
            assert_same_clip(features["a3"], clips[0][2])
        assert validate(tmp_path) == []
    finally:
        holder.kill()
        holder.wait()


def test_validate_passes_a_good_shard_and_names_each_damage(tmp_path):
    clips = [make_clip("ok", 4, seed=1), make_clip("bad", 6, seed=2)]

    def damaged(name: str, damage) -> tuple[Path, list[str]]:
        path = write_shard(tmp_path / name, 0, clips)
        damage(path)
        return path, validate(path)

    path, problems = damaged("good", lambda path: None)
    assert problems == []

    def nan_in_context(path):
        with h5py.File(path, "r+") as handle:
            handle["frames/context"][5, 2] = np.nan

    path, problems = damaged("nan", nan_in_context)
    assert problems == [f"{path}: clip 'bad': context has NaN or inf"]

    def face_without_box(path):
        with h5py.File(path, "r+") as handle:
            row = 4 + int(np.flatnonzero(clips[1].has_face)[0])
            handle["frames/box"][row] = np.nan

    path, problems = damaged("box", face_without_box)
    assert problems == [f"{path}: clip 'bad': box has NaN where has_face is true"]

    def face_marked_absent(path):
        with h5py.File(path, "r+") as handle:
            handle["frames/has_face"][0] = False

    path, problems = damaged("mask", face_marked_absent)
    assert f"{path}: clip 'ok': face/face_map rows are not all zero where has_face is false" in problems
    assert f"{path}: clip 'ok': box is not NaN where has_face is false" in problems

    def lengths_do_not_add_up(path):
        with h5py.File(path, "r+") as handle:
            handle["clips/length"][0] = 5

    path, problems = damaged("table", lengths_do_not_add_up)
    assert f"{path}: clip table lengths add up to 11 frames, the frame datasets hold 10" in problems
    assert f"{path}: clip table: clip 'bad' starts at frame 4, expected 5 (gap or overlap)" in problems

    def truncated(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    path, problems = damaged("truncated", truncated)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: cannot be opened as HDF5")
    with pytest.raises(FeatureFileError, match="damaged or truncated"):
        open_features(path)


def test_validate_reads_a_clip_in_blocks_and_checks_timestamps_across_them(tmp_path, monkeypatch):
    monkeypatch.setattr(tools, "READ_BLOCK_BYTES", 1)  # one frame a block
    path = write_shard(tmp_path, 0, [make_clip("long", 9)])
    assert validate(path) == []
    with h5py.File(path, "r+") as handle:
        handle["frames/timestamps"][4] = handle["frames/timestamps"][3]
    assert validate(path) == [f"{path}: clip 'long': timestamps are not strictly increasing"]


def test_merge_of_two_machines_folders_gives_one_set(tmp_path):
    clips_a = [make_clip("a1", 3, seed=1), make_clip("a2", 5, seed=2)]
    clips_b = [make_clip("b1", 4, "", seed=3)]
    write_shard(tmp_path / "machine-a", 0, clips_a)
    write_shard(tmp_path / "machine-a", 1, [make_clip("a3", 2, seed=4)])
    write_shard(tmp_path / "machine-b", 0, clips_b)
    write_index(tmp_path / "machine-a")
    index = merge([tmp_path / "machine-a", tmp_path / "machine-b"], tmp_path / "all")
    assert index == tmp_path / "all" / INDEX_NAME
    paths = [entry["path"] for entry in json.loads(index.read_text())["shards"]]
    assert paths == ["../machine-a/shard-00000.h5", "../machine-a/shard-00001.h5", "../machine-b/shard-00000.h5"]
    with open_features(tmp_path / "all") as features:
        assert features.clip_ids == ["a1", "a2", "a3", "b1"]
        assert_same_clip(features["b1"], clips_b[0])
        assert_same_clip(features["a2"], clips_a[1])
    assert validate(tmp_path / "all") == []
    summary = inspect(tmp_path / "all")
    assert "shards        3" in summary and "clips         4" in summary and "unlabelled 1" in summary


def clip_heard(clip: ClipFeatures, track: AudioTrack, heard_frames: int) -> ClipFeatures:
    """`clip` with its first `heard_frames` frames heard, as a set extracted with log-mel features stores them."""
    has_audio = np.arange(len(clip.timestamps)) < heard_frames
    audio = np.where(has_audio[:, None], np.float32(-10), np.float32(0)) * np.ones((1, 128), np.float32)
    return dataclasses.replace(clip, audio=audio, has_audio=has_audio, audio_track=track)


UNKNOWN_CODEC = "audio codec unknown here (codec 'xyz' not found)"
DAMAGED = "damaged audio at 0.40 s (and 1 more)"


def test_inspect_says_what_a_set_heard_and_a_set_made_without_audio_says_nothing_of_it(tmp_path):
    # Imported here: the scripts that tests of this module run import it, and must not wait for torch and PyAV.
    from extract.clips import audio_settings

    hearing = extractor_attrs(**audio_settings({"audio_features": "logmel", "audio_rate": 16000, "audio_window": None,
                                                "fps": 5.0}))
    write_shard(tmp_path / "heard", 0, [clip_heard(make_clip("aac", 6, seed=1), AudioTrack("aac", 44100, 2), 6),
                                        clip_heard(make_clip("aac 48k", 4, seed=2),
                                                   AudioTrack("aac", 48000, 2, DAMAGED), 2)], attrs=hearing)
    write_shard(tmp_path / "heard", 1, [clip_heard(make_clip("mp3", 5, seed=3), AudioTrack("mp3", 44100, 1), 5),
                                        clip_heard(make_clip("mute", 3, seed=4), AudioTrack(note=NO_TRACK), 0),
                                        clip_heard(make_clip("odd", 2, seed=5), AudioTrack(note=UNKNOWN_CODEC), 0)],
                attrs=hearing)
    write_index(tmp_path / "heard")
    summary = inspect_summary(tmp_path / "heard")
    assert summary.audio == AudioSummary(
        features="logmel", dim=128, clips=5, frames=20, frames_with_audio=13, with_track=3, without_track=1,
        codecs={"aac": 2, "mp3": 1}, rates={44100: 2, 48000: 1}, channels={2: 2, 1: 1},
        unread=[("aac 48k", DAMAGED), ("odd", UNKNOWN_CODEC)],
    )
    assert inspect(tmp_path / "heard").split("\nattributes:")[0].endswith(
        "audio         logmel, 128 values a frame\n"
        "audio frames  13 of 20 with audio (65.0%)\n"
        "audio tracks  3 clips with a track, 1 without, 1 not known\n"
        "audio codecs  aac (2 clips), mp3 (1 clip)\n"
        "sample rates  44100 Hz (2 clips), 48000 Hz (1 clip)\n"
        "channels      2 (2 clips), 1 (1 clip)\n"
        "audio unread  2 clips (`features report` lists why)"
    )
    three_shards(tmp_path / "silent")
    summary = inspect_summary(tmp_path / "silent")
    assert summary.audio is None and not [key for key, _ in summary.facts if "audio" in key or key == "channels"]


def test_merge_refuses_a_clip_id_present_on_two_machines(tmp_path):
    first = write_shard(tmp_path / "a", 0, [make_clip("same", 3)])
    second = write_shard(tmp_path / "b", 0, [make_clip("same", 4)])
    with pytest.raises(FeatureFileError) as err:
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert "'same'" in str(err.value) and str(first) in str(err.value) and str(second) in str(err.value)
    assert not (tmp_path / "out" / INDEX_NAME).exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(context=np.zeros((4, CONTEXT_DIM + 1), np.float16)), "context has shape"),
        (dict(label="elated"), "label 'elated'"),
        (dict(has_face=np.zeros(4, bool)), "not all zero where has_face is false"),
        (dict(timestamps=np.array([0.0, 0.2, 0.2, 0.4])), "timestamps are not strictly increasing"),
        (dict(has_face=np.ones(4, np.float32)), "has_face has dtype float32"),
        (dict(context=np.full((4, CONTEXT_DIM), 1e6)), "context overflows float16"),
    ],
)
def test_the_writer_refuses_clips_that_break_the_schema(tmp_path, change, message):
    clip = dataclasses.replace(make_clip("x", 4), **change)
    with ShardWriter(tmp_path / shard_name(0), extractor_attrs()) as writer:
        with pytest.raises(ValueError, match=message):
            writer.add_clip(clip)
        assert writer.n_clips == 0 and writer.n_frames == 0
        writer.add_clip(make_clip("y", 2))
        assert (writer.n_clips, writer.n_frames) == (1, 2)


def test_the_writer_refuses_incomplete_attrs_and_existing_shards(tmp_path):
    attrs = extractor_attrs()
    del attrs["detector_weights_sha256"]
    with pytest.raises(ValueError, match="detector_weights_sha256"):
        ShardWriter(tmp_path / shard_name(0), attrs)
    write_shard(tmp_path, 0, [make_clip("a", 2)])
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path / shard_name(0), extractor_attrs())
    assert [p.name for p in tmp_path.iterdir()] == [shard_name(0)]


@pytest.mark.parametrize("change, message", [
    (dict(context_dim=MAX_CONTEXT_DIM + 1), "context_dim 262145 is not an int from 1 to 262144"),
    (dict(classes=["happy", "happy"]), "is not a list of distinct non-empty strings"),
    (dict(fps=float("inf")), "fps inf is not a positive number"),
    (dict(notes=np.arange(3)), "attribute 'notes' is a ndarray"),
])
def test_the_writer_refuses_attrs_readers_would_refuse_with_the_readers_check(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        ShardWriter(tmp_path / shard_name(0), extractor_attrs(**change))
    assert list(tmp_path.iterdir()) == []


def test_the_content_hash_is_of_the_content_as_read_back_and_a_copy_keeps_it(tmp_path):
    # numpy scalars and tuples from the caller are stored and read back as plain numbers and lists
    attrs = extractor_attrs(fps=np.float32(5.0), detect_every=np.int64(1), classes=tuple(CHEAVD_CLASSES))
    path = write_shard(tmp_path / "gzip", 0, [make_clip("a", 3), make_clip("b", 5, "")], attrs=attrs)
    with h5py.File(path, "r") as handle:
        stored = handle.attrs["content_sha256"]
    with open_features(path) as features:
        shard = features.shards[0]
        assert stored == content_sha256(shard.attrs, shard.table) and shard.attrs["content_sha256"] == stored
    repack(tmp_path / "gzip", tmp_path / "none", "none")
    with h5py.File(tmp_path / "none" / shard_name(0), "r") as copy:
        assert copy.attrs["content_sha256"] == stored
    with h5py.File(path, "r+") as older:  # a shard written before the hash existed is copied and resumed too
        del older.attrs["content_sha256"]
    write_index(tmp_path / "gzip")
    repack(tmp_path / "gzip", tmp_path / "none", "none")
    assert validate(tmp_path / "none") == []


def stored_bytes(dataset: h5py.Dataset) -> bytes:
    """The values' bytes (NaN payloads included); variable-length strings as their UTF-8 text."""
    if h5py.check_string_dtype(dataset.dtype):
        return "\0".join(dataset.asstr()[()]).encode()
    return dataset[()].tobytes()


def stored_shards(folder: Path) -> list[dict]:
    """Each shard of a folder as stored: attributes, clip table, and every dataset's bytes and filters."""
    shards = []
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as handle:
            datasets = {f"{group}/{name}": handle[group][name] for group in ("frames", "clips") for name in handle[group]}
            shards.append({
                "attrs": dict(handle.attrs),
                "bytes": {name: stored_bytes(dataset) for name, dataset in datasets.items()},
                "filters": {(d.compression, d.compression_opts, d.shuffle) for d in handle["frames"].values()},
            })
    return shards


def test_repack_to_none_and_back_to_gzip_keeps_every_byte_attribute_and_clip(tmp_path):
    three_shards(tmp_path / "gzip")
    for source, out, compression in (("gzip", "none", "none"), ("none", "gzip-again", "gzip"), ("gzip-again", "none-again", "none")):
        assert repack(tmp_path / source, tmp_path / out, compression) == tmp_path / out / INDEX_NAME
        assert validate(tmp_path / out) == []
    original, uncompressed = stored_shards(tmp_path / "gzip"), stored_shards(tmp_path / "none")
    for copy in ("none", "gzip-again", "none-again"):
        shards = stored_shards(tmp_path / copy)
        assert [(s["attrs"], s["bytes"]) for s in shards] == [(s["attrs"], s["bytes"]) for s in original]  # `created` too
    assert {f for s in original for f in s["filters"]} == {("gzip", 4, True)}
    assert {f for s in uncompressed for f in s["filters"]} == {(None, None, False)}
    assert [s["filters"] for s in stored_shards(tmp_path / "gzip-again")] == [s["filters"] for s in original]
    with open_features(tmp_path / "gzip") as before, open_features(tmp_path / "none-again") as after:
        assert after.clip_ids == before.clip_ids and after.attrs == before.attrs
        assert [s.table for s in after.shards] == [s.table for s in before.shards]
    assert "compression   none\n" in inspect(tmp_path / "none") and "compression   gzip\n" in inspect(tmp_path / "gzip")


def test_repack_copies_a_merged_set_resumes_and_refuses_foreign_shards(tmp_path):
    write_shard(tmp_path / "machine-a", 0, [make_clip("a1", 3, seed=1), make_clip("a2", 5, seed=2)])
    write_shard(tmp_path / "machine-a", 1, [make_clip("a3", 2, seed=3)])
    write_shard(tmp_path / "machine-b", 0, [make_clip("b1", 4, "", seed=4)])  # same file name as machine-a's first
    merge([tmp_path / "machine-a", tmp_path / "machine-b"], tmp_path / "all")
    out = tmp_path / "copy"
    repack(tmp_path / "all", out, "none")
    with open_features(tmp_path / "all") as merged, open_features(out) as copy:
        assert copy.clip_ids == merged.clip_ids == ["a1", "a2", "a3", "b1"]
        assert_same_clip(copy["b1"], make_clip("b1", 4, "", seed=4))
    kept = (out / shard_name(0)).stat().st_mtime_ns
    (out / shard_name(2)).unlink()  # as if the repack had been killed while writing its last shard
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(REPO), str(out / shard_name(2))])
    assert killed.returncode == 1 and len(temp_files(out)) == 1
    repack(tmp_path / "all", out, "none")
    assert (out / shard_name(0)).stat().st_mtime_ns == kept and validate(out) == [] and temp_files(out) == []
    with pytest.raises(FeatureFileError, match=f"{out / shard_name(0)}: exists and is not .* repacked with gzip"):
        repack(tmp_path / "all", out, "gzip")
    foreign = tmp_path / "fresh" / "other.h5"
    foreign.parent.mkdir()
    shutil.copy(tmp_path / "machine-a" / shard_name(1), foreign)
    with pytest.raises(FeatureFileError, match=f"{foreign}: not a shard of this repack"):
        repack(tmp_path / "machine-b", foreign.parent, "none")


def test_features_repack_runs_from_the_command_line(tmp_path):
    three_shards(tmp_path / "gzip")
    command = [sys.executable, "cli.py", "features", "repack", str(tmp_path / "gzip"), "--out", str(tmp_path / "none")]
    done = subprocess.run([*command, "--compression", "none"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'none' / INDEX_NAME}"
    done = subprocess.run([*command, "--compression", "gzip"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'none' / shard_name(0)}: exists and is not" in done.stderr


def test_the_command_line_offers_exactly_the_schemas_compressions():
    import cli

    option = next(p for p in cli.features_repack.params if p.name == "compression")
    assert sorted(option.type.choices) == sorted(COMPRESSIONS)
