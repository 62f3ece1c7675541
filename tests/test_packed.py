"""Preloaded steps (train/packed.py): batches gathered from the packed arrays are today's collated
batches bit for bit, and the steps cache on disk is made once, shared, checked and disposable."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from features.labels import CHEAVD_CLASSES
from features.reader import open_features, write_index
from features.schema import shard_name
from features.writer import ShardWriter
from outputs import TEMP_SUFFIX
from tests.feature_files import HEARING, clip_of, extractor_attrs, with_voice
from train.data import STEP_INPUTS, BufferPool, ClipDataset, make_loader
from train.packed import CACHE_ENV, IN_USE_FILE, LOCK_FILE, cache_key, cached_steps, packed_in_memory, preloaded

ROOT = Path(__file__).resolve().parents[1]
CLIPS_PER_SHARD = 13


def varied_clip(i: int, rng: np.random.Generator):
    """Lengths 1-30, some frames without a face, every fifth clip without any, every seventh unlabelled; some
    frames without audio, every third clip without any."""
    frames = int(rng.integers(1, 31))
    has_face = rng.random(frames) > 0.3
    if i % 5 == 0:
        has_face[:] = False
    elif not has_face.any():
        has_face[0] = True
    face = rng.normal(0, 1, (frames, 128)).astype(np.float32)
    context = rng.normal(0, 1, (frames, 48)).astype(np.float32)
    has_audio = (rng.random(frames) > 0.3) & (i % 3 != 0)
    clip = with_voice(clip_of(f"train/{i:03d}", CHEAVD_CLASSES[i % 4], has_face, face, context),
                      rng.normal(0, 1, (frames, HEARING["audio_dim"])), has_audio)
    return dataclasses.replace(clip, label="") if i % 7 == 0 else clip


@pytest.fixture(scope="module")
def varied_split(tmp_path_factory) -> Path:
    """One split of 40 clips over 4 shards, extracted with audio, float16 context as extract stores it."""
    folder = tmp_path_factory.mktemp("varied") / "train"
    folder.mkdir()
    rng = np.random.default_rng(5)
    attrs = extractor_attrs(split="train", context_dim=48, **HEARING)
    for first in range(0, 40, CLIPS_PER_SHARD):
        with ShardWriter(folder / shard_name(first // CLIPS_PER_SHARD), attrs) as writer:
            for i in range(first, min(first + CLIPS_PER_SHARD, 40)):
                writer.add_clip(varied_clip(i, rng))
    write_index(folder)
    return folder


# Inputs whose steps differ (train/data.py's policy): a model that sees and hears (the frames with a face), one that
# only hears (every frame), and an ensemble of both (every frame, with has_face).
SEES = tuple(name for name in STEP_INPUTS if name != "has_face")
HEARS = ("audio", "has_audio")


def batches(folder: Path, packed: bool, train: bool, workers: int, epochs: int = 1,
            inputs: tuple[str, ...] = SEES) -> Iterator[dict]:
    """The loader's batches over `epochs` epochs, one at a time (a packed loader then reuses its memory)."""
    with open_features(folder) as features:
        steps = packed_in_memory(features, inputs) if packed else None
        dataset = ClipDataset(features, list(features.attrs["classes"]), train=train, inputs=inputs, steps=steps)
        torch.manual_seed(11)  # the random starts of training come from torch's generator
        loader = make_loader(dataset, batch_size=8, num_workers=workers, seed=4, shuffle=train)
        for _ in range(epochs):
            yield from loader


# What each input's batches hold: as stored when gathered from packed steps, as collate makes them otherwise.
STORED = {"face": torch.float32, "context": torch.float16, "face_map": torch.float16, "audio": torch.float32,
          "has_audio": torch.bool, "has_face": torch.bool}
COLLATED = {name: torch.bool if dtype == torch.bool else torch.float32 for name, dtype in STORED.items()}


@pytest.mark.parametrize("train, workers, inputs", [(True, 0, SEES), (False, 0, SEES), (True, 2, SEES),
                                                   (True, 0, HEARS), (False, 0, STEP_INPUTS)])
def test_packed_batches_are_the_collated_batches_bit_for_bit(varied_split, train, workers, inputs):
    """Three epochs, each packed batch compared and dropped before the next is made: batches of other
    lengths then reuse the memory of earlier ones, whose steps must not show through the padding."""
    collated = list(batches(varied_split, packed=False, train=train, workers=workers, epochs=3, inputs=inputs))
    gathered = batches(varied_split, packed=True, train=train, workers=workers, epochs=3, inputs=inputs)
    assert len(collated) == 15
    starts_differ = False
    for old in collated:
        new = next(gathered)
        assert new["clip_id"] == old["clip_id"]
        assert torch.equal(new["mask"], old["mask"]) and torch.equal(new["label"], old["label"])
        for name in inputs:
            # Stored dtypes travel (float16 context and maps); converted, they are collate's values.
            assert new[name].dtype == STORED[name] and old[name].dtype == COLLATED[name], name
            assert new[name].shape == old[name].shape and torch.equal(new[name].to(old[name].dtype), old[name]), name
        starts_differ |= bool((~old["mask"][:, -1]).any())
        del new
    assert next(gathered, None) is None
    assert starts_differ  # padding was there to compare
    assert any_unlabelled(collated) and any_step_without_audio(collated)
    if inputs != HEARS:  # which steps a model that only hears takes: the next test
        # Faceless steps: those of clips without a face for a model that sees; any frame without one for the others.
        assert any_faceless_step(collated, clips_without_face=inputs == SEES)


@pytest.mark.parametrize("packed", [False, True])
def test_a_model_that_sees_steps_through_the_frames_with_a_face_one_that_only_hears_through_every_frame(
        varied_split, packed):
    with open_features(varied_split) as features:
        frames = {clip_id: features.read(clip_id, ("has_face",))["has_face"] for clip_id in features.clip_ids}
        for inputs in (SEES, ("context",), HEARS, STEP_INPUTS):
            steps = packed_in_memory(features, inputs) if packed else None
            dataset = ClipDataset(features, list(features.attrs["classes"]), train=False, inputs=inputs, steps=steps)
            for i, clip_id in enumerate(dataset.clip_ids):
                has_face = frames[clip_id]
                every_frame = "context" not in inputs or "has_face" in inputs or not has_face.any()
                assert len(dataset[i]) == (len(has_face) if every_frame else has_face.sum()), (inputs, clip_id)
        assert any(has_face.any() and not has_face.all() for has_face in frames.values())


def any_unlabelled(batch_list: list[dict]) -> bool:
    return any(bool((batch["label"] == -1).any()) for batch in batch_list)


def any_faceless_step(batch_list: list[dict], clips_without_face: bool) -> bool:
    """Whether a batch has a step without a face, in a clip where no frame has one or else in a clip with faces."""
    for batch in batch_list:
        faceless = batch["mask"] & ~batch["has_face"] if "has_face" in batch else batch["face"].abs().sum(dim=2) == 0
        faceless_clips = (faceless == batch["mask"]).all(dim=1)
        if bool((faceless.any(dim=1) & (faceless_clips if clips_without_face else ~faceless_clips)).any()):
            return True
    return False


def any_step_without_audio(batch_list: list[dict]) -> bool:
    return any(bool((batch["mask"] & ~batch["has_audio"]).any()) for batch in batch_list)


def test_batch_memory_is_used_again_only_once_no_batch_or_view_of_one_holds_it(varied_split):
    with open_features(varied_split) as features:
        dataset = ClipDataset(features, list(features.attrs["classes"]), train=False, inputs=("context",),
                              steps=packed_in_memory(features, ("context",)))
        clips, starts = list(range(8)), np.zeros(8, np.int64)
        first = dataset.gather(clips, starts)["context"]
        address, kept = first.data_ptr(), first[2:4]
        expected = kept.clone()
        del first
        second = dataset.gather(list(range(8, 16)), starts)["context"]
        assert second.data_ptr() != address and torch.equal(kept, expected)  # the view still holds the first
        del kept, second
        third = dataset.gather(clips, starts)["context"]
        assert third.data_ptr() == address  # nothing holds it: used again, with this batch's values
        assert torch.equal(third, next(batches(varied_split, packed=False, train=False, workers=0))["context"].half())


def test_the_pool_replaces_a_free_buffer_too_small_and_keeps_held_ones():
    pool = BufferPool()
    short, longer = np.ones((1, 2), bool), np.ones((1, 5), bool)
    held = pool.take((1, 2, 3), np.float16, short)
    held[:] = 1
    dropped = pool.take((1, 2, 3), np.float16, short)
    del dropped
    grown = pool.take((1, 5, 3), np.float16, longer)  # the free buffer is too small: replaced
    assert len(pool.buffers[np.dtype(np.float16), (3,)]) == 2 and np.all(held == 1)
    grown[:] = 2
    del grown
    padded = pool.take((1, 4, 3), np.float16, np.array([[True, False, False, False]]))
    assert padded.base is not None and np.all(padded[0, 1:] == 0)  # the earlier steps, now padding, zeroed


def test_the_cache_is_made_once_then_mapped_and_travels_to_workers_as_its_folder(varied_split, tmp_path):
    with open_features(varied_split) as features:
        first, written = cached_steps(features, ("face", "context"), tmp_path)
        assert written == ["offsets", "face", "context"]
        stamps = {path.name: path.stat().st_mtime_ns for path in first.folder.iterdir()}
        again, written = cached_steps(features, ("context", "face_map"), tmp_path)
        assert written == ["face_map"]  # offsets and context reused, the new input added
        assert all(first.folder.joinpath(name).stat().st_mtime_ns == stamp for name, stamp in stamps.items()
                   if name.endswith(".npy"))
        memory = packed_in_memory(features, SEES)
    assert isinstance(again.arrays["context"], np.memmap) and not again.arrays["context"].flags.writeable
    assert np.array_equal(again.offsets, memory.offsets)
    for name in ("context", "face_map"):
        assert again.arrays[name].dtype == memory.arrays[name].dtype == np.float16
        assert np.array_equal(again.arrays[name], memory.arrays[name])
    shipped = pickle.dumps(again)
    assert len(shipped) < 2000  # the folder's name, not the arrays
    back = pickle.loads(shipped)
    assert np.array_equal(back.arrays["face_map"], memory.arrays["face_map"])
    assert np.array_equal(back.lengths, memory.lengths)


def test_the_steps_of_models_that_only_hear_are_cached_beside_the_others_in_files_of_their_own(varied_split, tmp_path):
    with open_features(varied_split) as features:
        seeing, _ = cached_steps(features, ("face", "audio"), tmp_path)
        hearing, written = cached_steps(features, HEARS, tmp_path)
        assert hearing.folder == seeing.folder and hearing.every_frame and not seeing.every_frame
        assert written == ["offsets", "audio", "has_audio"]  # the seeing model's audio steps are other rows
        assert sorted(path.name for path in seeing.folder.glob("*.npy")) == [
            "audio.every-frame.npy", "audio.npy", "face.npy", "has_audio.every-frame.npy", "offsets.every-frame.npy",
            "offsets.npy"]
        for inputs in (HEARS, ("face", "audio")):
            assert cached_steps(features, inputs, tmp_path)[1] == []  # each kind found, none written again
        memory = packed_in_memory(features, HEARS)
        assert np.array_equal(hearing.offsets, memory.offsets) and memory.offsets[-1] == features.n_frames
        assert seeing.offsets[-1] < features.n_frames
        back = pickle.loads(pickle.dumps(hearing))  # as it travels to a loader's worker
        for name in HEARS:
            assert np.array_equal(back.arrays[name], memory.arrays[name])
            assert np.array_equal(hearing.arrays[name], memory.arrays[name])


def wait_for_the_background_sync() -> None:
    for thread in threading.enumerate():
        if thread.name == "steps-cache-sync":
            thread.join(timeout=60)


def test_new_cache_files_reach_the_disk_in_the_background_and_are_marked_so(varied_split, tmp_path):
    with open_features(varied_split) as features:
        steps, _ = cached_steps(features, ("face", "context"), tmp_path)
        wait_for_the_background_sync()
        files = sorted(path.name for path in steps.folder.glob("*.npy"))
        assert files == ["context.npy", "face.npy", "offsets.npy"]
        assert sorted(path.name for path in steps.folder.glob("*.synced")) == [f"{name}.synced" for name in files]
        # Unsynced and older than the machine's start: a crash may have left zeros in it, so it is made again.
        context = steps.folder / "context.npy"
        (steps.folder / "context.npy.synced").unlink()
        os.utime(context, (0, 0))
        _, written = cached_steps(features, ("face", "context"), tmp_path)
        assert written == ["context"] and context.stat().st_mtime > 0
        # Synced, however old: used as it is.
        wait_for_the_background_sync()
        os.utime(context, (0, 0))
        _, written = cached_steps(features, ("face", "context"), tmp_path)
        assert written == [] and context.stat().st_mtime == 0


def test_replaced_shards_get_a_new_cache_folder(varied_split, tmp_path):
    with open_features(varied_split) as features:
        before = cache_key(features)
        shard = features.shards[0].path
        stat = shard.stat()
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        try:
            assert cache_key(features) != before
        finally:
            os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert cache_key(features) == before


PRELOAD = (
    "import sys\n"
    "from features.reader import open_features\n"
    "from train.packed import preload_steps\n"
    "with open_features(sys.argv[1]) as features:\n"
    "    steps = preload_steps(features, ('face',), 'train', print)\n"
    "print(steps.folder)\n"
)


def preload_in_a_new_process(split: Path, root: Path) -> tuple[Path, list[str]]:
    """The cache folder a new run on `split` maps, and the lines it says."""
    done = subprocess.run([sys.executable, "-c", PRELOAD, str(split)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, CACHE_ENV: str(root)})
    assert done.returncode == 0, done.stderr
    *lines, folder = done.stdout.splitlines()
    return Path(folder), lines


@contextmanager
def flocked(path: Path, operation: int) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, operation)
        yield


def test_the_cache_of_replaced_shards_is_removed_once_no_process_uses_or_builds_it(varied_split, tmp_path):
    split = shutil.copytree(varied_split, tmp_path / "features" / "train")
    other = shutil.copytree(varied_split, tmp_path / "other" / "train")
    root = tmp_path / "cache"
    earlier, _ = preload_in_a_new_process(split, root)
    other_split, _ = preload_in_a_new_process(other, root)
    for shard in split.glob("*.h5"):  # extracted again
        stat = shard.stat()
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    with flocked(earlier / IN_USE_FILE, fcntl.LOCK_SH):  # a run still training on the earlier shards
        current, lines = preload_in_a_new_process(split, root)
    assert current != earlier and earlier.exists() and not any("removed" in line for line in lines)
    with flocked(earlier / LOCK_FILE, fcntl.LOCK_EX):  # a process building it
        assert preload_in_a_new_process(split, root) == (current, [])
    assert earlier.exists()

    assert preload_in_a_new_process(split, root)[1] == [
        f"removed {earlier}, the steps cache of earlier versions of these shards (0.00 GB)"
    ]
    assert sorted(root.iterdir()) == sorted([current, other_split]), "the cache of other shards stays"
    with open_features(split) as features:
        steps, written = cached_steps(features, ("face",), root)
        assert written == [] and np.array_equal(steps.arrays["face"], packed_in_memory(features, ("face",)).arrays["face"])


@pytest.mark.parametrize("damage", ["truncated", "other shape", "a pickle", "a leftover temporary file"])
def test_a_damaged_cache_is_rebuilt_and_never_unpickled(varied_split, tmp_path, damage):
    with open_features(varied_split) as features:
        good, _ = cached_steps(features, ("face",), tmp_path)
        expected = np.array(good.arrays["face"])
        face = good.folder / "face.npy"
        del good
        if damage == "truncated":
            face.write_bytes(face.read_bytes()[:1000])
        elif damage == "other shape":
            np.save(face, np.zeros((3, 128), np.float32))
        elif damage == "a pickle":
            with open(face, "wb") as file:
                np.save(file, np.array([{"x": 1}], dtype=object), allow_pickle=True)
        else:
            face.parent.joinpath(f".face.npy.x{TEMP_SUFFIX}").write_bytes(b"half")
        steps, written = cached_steps(features, ("face",), tmp_path)
    assert written == ([] if damage == "a leftover temporary file" else ["face"])
    assert np.array_equal(steps.arrays["face"], expected)
    assert not [path for path in steps.folder.iterdir() if path.name.endswith(TEMP_SUFFIX)]


def test_a_cache_that_cannot_be_written_falls_back_to_memory_and_says_so(varied_split, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache would go")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "steps"))
    lines = []
    with open_features(varied_split) as features:
        steps = preloaded(features, "always", ("face",), "train", log=lines.append)
        assert steps.folder is None and np.array_equal(steps.offsets, packed_in_memory(features, ("face",)).offsets)
        monkeypatch.setattr("train.packed.fits_in_memory", lambda features, inputs: False)
        assert preloaded(features, "auto", ("face",), "train", log=lines.append) is None
    assert len(lines) == 2 and all(f"${CACHE_ENV}" in line and str(blocker / "steps") in line for line in lines)
    assert "packed in memory" in lines[0] and "read from the shards every epoch" in lines[1]


BUILD = """
import sys
from features.reader import open_features
from train.packed import cached_steps
from pathlib import Path
with open_features(sys.argv[1]) as features:
    steps, written = cached_steps(features, ("face", "context"), Path(sys.argv[2]))
    print(",".join(written), steps.arrays["context"].filename)
"""


def test_jobs_starting_together_build_the_cache_once_and_map_the_same_file(varied_split, tmp_path):
    jobs = [subprocess.Popen([sys.executable, "-c", BUILD, str(varied_split), str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [job.communicate(timeout=120)[0].split() for job in jobs]
    assert all(job.returncode == 0 for job in jobs)
    built = [words[0] for words in outputs if len(words) == 2]
    assert built == ["offsets,face,context"]  # one job wrote, the others waited and mapped
    assert len({words[-1] for words in outputs}) == 1


MAP_AND_WAIT = """
import sys
from pathlib import Path
import numpy as np
from features.reader import open_features
from train.packed import cached_steps
with open_features(sys.argv[1]) as features:
    steps, _ = cached_steps(features, ("context",), Path(sys.argv[2]))
context = steps.arrays["context"]
print(context.filename, float(context.astype(np.float64).sum()), flush=True)  # every page read
sys.stdin.read()  # held until the test has looked
"""


def mapped_bytes(pid: int, path: str) -> tuple[int, int]:
    """(Rss, Pss) of `path`'s mappings in process `pid`, from /proc/PID/smaps."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == path
        elif inside and fields[0] in ("Rss:", "Pss:"):
            value = int(fields[1]) * 1024
            rss, pss = (rss + value, pss) if fields[0] == "Rss:" else (rss, pss + value)
    return rss, pss


def test_two_jobs_on_one_split_hold_one_copy_of_its_steps_between_them(tmp_path):
    """What `compare --jobs 2` relies on: each of two processes reads every step of the mapped cache,
    and the machine holds those pages once (each process is charged half: proportional set size)."""
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = np.random.default_rng(2)
    with ShardWriter(folder / shard_name(0), extractor_attrs(split="train", context_dim=25088)) as writer:
        for i in range(16):
            context = np.maximum(rng.normal(0, 1, (16, 25088)), 0).astype(np.float32)
            writer.add_clip(clip_of(f"train/{i:02d}", "happy", np.ones(16, bool), np.ones((16, 128), np.float32),
                                    context))
    write_index(folder)
    jobs = [subprocess.Popen([sys.executable, "-c", MAP_AND_WAIT, str(folder), str(tmp_path / "cache")], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        lines = [job.stdout.readline().split() for job in jobs]
        figures = [mapped_bytes(job.pid, lines[0][0]) for job in jobs]
    finally:
        for job in jobs:
            job.communicate("", timeout=60)
    assert lines[0] == lines[1]  # the same file, the same values
    size = Path(lines[0][0]).stat().st_size
    assert size > 16 * 16 * 25088 * 2
    assert all(rss > 0.95 * size for rss, _ in figures)  # each job reads every page of it...
    assert sum(pss for _, pss in figures) < 1.05 * size  # ...and the two together hold one copy
