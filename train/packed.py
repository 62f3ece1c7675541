"""Preloaded steps: every clip's steps of a split in one contiguous array per input, for batches
gathered at memory speed.

Clip i of the split (in `FeatureSet.clip_ids` order) is rows `offsets[i]:offsets[i + 1]` of each
array, its steps under `train.data`'s policy (its frames with a face for the models that see,
every frame for those that only hear: two sets of files), in the stored dtypes (face float32,
context and face maps as the shards hold them, float16 by default): a batch is a few contiguous
copies per input, with no per-clip objects to walk and no float32 copy of the context kept.

The arrays live in a cache on disk, one folder per split, made once by one read of the shards
and then memory-mapped read-only: every process training on the split (`compare --jobs N`, or
several `train` commands on one machine) maps the same pages, so the machine holds one copy, and
a later run of the same split starts without reading the shards again. The folder is named by a
hash of the shards' paths, sizes and modification times, so replaced shards make a new one; each
input is its own file, made the first time a model needs it. A new file is written to disk in
the background while training starts (waiting for the disk would double the cost of making it)
and marked once it is there; a file not so marked is used only in the boot it was written in, and
made again after a restart, since a crash can leave holes of zeros in it. The cache is
disposable: delete any of it at any time. A folder made from earlier versions of a split's shards
(same paths, other sizes or times) can never be read again, so it is removed once no process uses
it: re-extracting a split does not leave gigabytes behind. Where the cache cannot be written (a
read-only or full disk), the arrays are packed in memory instead.

Nothing in the cache is trusted beyond its shapes: files are loaded without pickles, checked
against the split they claim to hold, and rebuilt when they do not fit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np

from features.reader import FeatureSet, absolute
from features.schema import shard_frame_arrays
from outputs import fsync_path, is_temporary, read_json_object, user_cache, write_atomically, write_json
from train.data import step_frames_mask, steps_every_frame

logger = logging.getLogger(__name__)

CACHE_ENV = "CACA_STEPS_DIR"
# Bump when the layout or the choice of a clip's steps changes: older folders are then never read.
CACHE_VERSION = 1
OFFSETS = "offsets"
# The files of the steps of the models that step through every frame end so; the others' end in ".npy" alone.
EVERY_FRAME_SUFFIX = ".every-frame"
SOURCE_FILE = "source.json"  # the shards a folder was made from: which folders hold earlier versions of them
LOCK_FILE = "lock"
# Held shared by every process using a folder, for its life: a folder is removed only when no one holds it.
IN_USE_FILE = "in-use"
SYNCED_SUFFIX = ".synced"
# A file written this many seconds after the machine's start counts as written since it (/proc/uptime
# and the clock are read at different instants).
BOOT_MARGIN = 1.0


# "auto" packs a split in memory, when the steps cache cannot be used, if its arrays take at
# most this share of the memory available now; otherwise it reads the shards every epoch.
PRELOAD_MEMORY_SHARE = 0.5


def steps_cache_dir() -> Path:
    """$CACA_STEPS_DIR, else ~/.cache/caca-rnn/steps."""
    return user_cache("steps", CACHE_ENV)


@dataclass
class PackedSteps:
    """Every clip's steps of some inputs: clip i is rows offsets[i]:offsets[i + 1] of each array."""

    offsets: np.ndarray  # int64, one more than the clips, from 0
    arrays: dict[str, np.ndarray]  # input name -> (all steps, ...) in the stored dtype
    every_frame: bool  # whose steps: the models' that step through every frame, or the others' (train.data)
    folder: Path | None = None  # the cache folder the arrays are mapped from; None: in memory
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.diff(self.offsets)

    def __getstate__(self) -> dict:
        """Mapped arrays travel to spawned workers as their folder, never as a copy of their pages."""
        if self.folder is None:
            return self.__dict__
        return dict(self.__dict__, offsets=None, arrays=list(self.arrays), lengths=None)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.folder is not None:
            self.offsets = np.load(step_file(self.folder, OFFSETS, self.every_frame), allow_pickle=False)
            self.arrays = {name: np.load(step_file(self.folder, name, self.every_frame), mmap_mode="r",
                                         allow_pickle=False)
                           for name in state["arrays"]}
            self.__post_init__()


def step_file(folder: Path, name: str, every_frame: bool) -> Path:
    """The cache file of the offsets (OFFSETS) or of input `name`, for the steps of either kind of model."""
    return folder / f"{name}{EVERY_FRAME_SUFFIX if every_frame else ''}.npy"


def step_offsets(features: FeatureSet, inputs: tuple[str, ...]) -> np.ndarray:
    """Where each clip's steps for a model of `inputs` start in the packed arrays (has_face only: one byte per
    frame)."""
    counts = []
    for number, shard in enumerate(features.shards):
        has_face = features.read_shard(number, ("has_face",))["has_face"]
        for start, length in zip(shard.table["start"], shard.table["length"]):
            counts.append(int(step_frames_mask(has_face[start: start + length], inputs).sum()))
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def fill_steps(features: FeatureSet, name: str, inputs: tuple[str, ...], offsets: np.ndarray, out: np.ndarray) -> None:
    """Write every clip's steps of `name`, for a model of `inputs`, into `out`: one whole read of the array per
    shard."""
    clip = 0
    for number, shard in enumerate(features.shards):
        whole = features.read_shard(number, tuple(dict.fromkeys(("has_face", name))))
        for start, length in zip(shard.table["start"], shard.table["length"]):
            keep = step_frames_mask(whole["has_face"][start: start + length], inputs)
            out[offsets[clip]: offsets[clip + 1]] = whole[name][start: start + length][keep]
            clip += 1


def input_layout(features: FeatureSet, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    """The stored dtype of input `name` and the shape of one of its steps."""
    return shard_frame_arrays(features.attrs)[name]


def packed_in_memory(features: FeatureSet, inputs: tuple[str, ...]) -> PackedSteps:
    offsets = step_offsets(features, inputs)
    arrays = {}
    for name in inputs:
        dtype, tail = input_layout(features, name)
        arrays[name] = np.empty((int(offsets[-1]), *tail), dtype)
        fill_steps(features, name, inputs, offsets, arrays[name])
    return PackedSteps(offsets, arrays, steps_every_frame(inputs))


def cache_key(features: FeatureSet) -> str:
    """Names a split's cache folder: the shards' absolute paths, sizes and modification times."""
    shards = []
    for shard in features.shards:
        stat = os.stat(shard.path)
        shards.append([str(absolute(shard.path)), stat.st_size, stat.st_mtime_ns])
    text = json.dumps({"version": CACHE_VERSION, "shards": shards})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_HELD: dict[Path, TextIO] = {}  # folder -> this process's open handle on its IN_USE_FILE


def hold_in_use(folder: Path) -> None:
    """Mark `folder` as used by this process until it ends (the lock goes with the process)."""
    if folder not in _HELD:
        handle = open(folder / IN_USE_FILE, "a")
        fcntl.flock(handle, fcntl.LOCK_SH)
        _HELD[folder] = handle


def remove_replaced(root: Path, current: Path, shards: list[str]) -> list[tuple[Path, int]]:
    """Remove the cache folders of `root` made from other versions of these same shards (the same
    paths under another key), skipping any that a process uses or builds now; the folders removed
    and their sizes."""
    removed = []
    for folder in root.iterdir():
        if folder == current or not folder.is_dir() or source_shards(folder) != shards:
            continue
        try:
            with unused(folder):
                size = cache_bytes(folder)
                shutil.rmtree(folder)
        except (BlockingIOError, FileNotFoundError):
            continue  # in use or being built, or removed by another process
        except OSError as exc:
            logger.debug("steps cache folder %s not removed: %s", folder, exc)
            continue
        removed.append((folder, size))
    return removed


def source_shards(folder: Path) -> list[str] | None:
    """The shard paths a folder's source file names; None when it has no readable one."""
    shards = (read_json_object(folder / SOURCE_FILE) or {}).get("shards")
    return shards if isinstance(shards, list) and all(isinstance(path, str) for path in shards) else None


@contextmanager
def unused(folder: Path) -> Iterator[None]:
    """Hold `folder`'s build and in-use locks exclusively; BlockingIOError when a process holds either."""
    with open(folder / LOCK_FILE, "a") as build, open(folder / IN_USE_FILE, "a") as use:
        fcntl.flock(build, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (made if missing): one process builds, the others then read."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def synced_marker(path: Path) -> Path:
    return path.with_name(path.name + SYNCED_SUFFIX)


def boot_time() -> float | None:
    """When the machine started (seconds since the epoch); None where /proc does not say."""
    try:
        return time.time() - float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def trusted(path: Path) -> bool:
    """Whether a cache file holds what was written: it reached the disk (its marker says so), or it
    was written since the machine started, so that whatever of it is not on disk yet is in memory.
    A file written before a crash that came before the disk had it can hold zeros in place of
    steps while keeping its shape; only such a file is refused (and made again)."""
    if synced_marker(path).exists():
        return True
    booted = boot_time()
    try:
        return booted is not None and path.stat().st_mtime > booted + BOOT_MARGIN
    except OSError:
        return False


def sync_in_background(paths: list[Path]) -> None:
    """Write new cache files to disk while training starts (waiting for it would cost as much as
    reading the shards), then mark each as synced; a file not marked when the process ends is
    marked by a later run, or made again after a restart."""
    def sync() -> None:
        for path in paths:
            try:
                if fsync_path(path).st_ino == os.stat(path).st_ino:  # still the file the cache names
                    synced_marker(path).touch()
            except OSError as exc:
                logger.debug("steps cache file %s not synced: %s", path, exc)
        fsync_path(paths[0].parent)

    threading.Thread(target=sync, name="steps-cache-sync", daemon=True).start()


def mapped(path: Path, fits: Callable[[np.ndarray], bool]) -> np.ndarray | None:
    """The .npy file at `path` memory-mapped read-only, or None when it is missing, not trusted or
    does not fit."""
    if not trusted(path):
        return None
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array if isinstance(array, np.ndarray) and fits(array) else None


def offsets_fit(features: FeatureSet) -> Callable[[np.ndarray], bool]:
    def fits(offsets: np.ndarray) -> bool:
        return (offsets.dtype == np.int64 and offsets.shape == (len(features) + 1,) and offsets[0] == 0
                and bool(np.all(np.diff(offsets) >= 0)))
    return fits


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # np.save given a name would add ".npy" to the temporary one
        np.save(file, array)


def cached_array(path: Path, dtype: np.dtype, shape: tuple[int, ...],
                 fill: Callable[[np.ndarray], None]) -> tuple[np.ndarray, bool]:
    """The cache's array at `path`, written first (whole, then renamed into place) unless a fitting one
    is there; and whether it was written now."""
    array = mapped(path, lambda found: found.dtype == dtype and found.shape == shape)
    if array is not None:
        return array, False

    def write(temporary: Path) -> None:
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=shape)
        fill(out)
        del out  # unmapped; the pages reach the disk in sync_in_background

    synced_marker(path).unlink(missing_ok=True)
    write_atomically(path, write)
    return np.load(path, mmap_mode="r", allow_pickle=False), True


def cached_steps(features: FeatureSet, inputs: tuple[str, ...], root: Path) -> tuple[PackedSteps, list[str]]:
    """The split's packed steps of `inputs` from the cache in `root` (made where missing), and the
    inputs written now. OSError when the cache cannot be read or written."""
    folder = root / cache_key(features)
    folder.mkdir(parents=True, exist_ok=True)
    hold_in_use(folder)
    every_frame = steps_every_frame(inputs)
    written = []
    with locked(folder / LOCK_FILE):
        remove_leftovers(folder)
        offsets_file = step_file(folder, OFFSETS, every_frame)
        offsets = mapped(offsets_file, offsets_fit(features))
        if offsets is None:
            computed = step_offsets(features, inputs)
            synced_marker(offsets_file).unlink(missing_ok=True)
            write_atomically(offsets_file, lambda tmp: save_npy(tmp, computed))
            offsets = np.load(offsets_file, mmap_mode="r", allow_pickle=False)
            written.append(OFFSETS)
        arrays = {}
        for name in inputs:
            dtype, tail = input_layout(features, name)
            arrays[name], new = cached_array(step_file(folder, name, every_frame), dtype, (int(offsets[-1]), *tail),
                                             lambda out, name=name: fill_steps(features, name, inputs, offsets, out))
            written += [name] if new else []
        if written:
            source = {"shards": shard_paths(features), "clips": len(features)}
            write_json(folder / SOURCE_FILE, source)
            sync_in_background([step_file(folder, name, every_frame) for name in written])
    return PackedSteps(np.array(offsets), arrays, every_frame, folder), written


def shard_paths(features: FeatureSet) -> list[str]:
    return [str(absolute(shard.path)) for shard in features.shards]


def remove_leftovers(folder: Path) -> None:
    """Temporary files of a build that was killed (the lock is held, so no build is under way)."""
    for path in folder.iterdir():
        if is_temporary(path.name):
            path.unlink(missing_ok=True)


def cache_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.npy"))


def preload_steps(features: FeatureSet, inputs: tuple[str, ...], what: str, log: Callable[[str], None],
                  fallback: bool = True) -> PackedSteps | None:
    """The split's steps of `inputs` from the shared cache; where it cannot be used, packed in
    memory (`fallback`) or None (read the shards). Says through `log` when it writes the cache or
    cannot use it."""
    root = steps_cache_dir()
    started = time.perf_counter()
    try:
        steps, written = cached_steps(features, inputs, root)
    except OSError as exc:
        instead = "packed in memory" if fallback else "read from the shards every epoch (it would not fit in memory)"
        log(f"the steps cache in {root} could not be used ({exc.strerror or exc}): the {what} steps are {instead}"
            f" (set ${CACHE_ENV} to a folder on a disk with room)")
        return packed_in_memory(features, inputs) if fallback else None
    for folder, size in remove_replaced(root, steps.folder, shard_paths(features)):
        log(f"removed {folder}, the steps cache of earlier versions of these shards ({size / 1e9:.2f} GB)")
    if written:
        kind = "every frame: " if steps.every_frame else ""
        log(f"cached the {what} steps ({kind}{', '.join(written)}) in {steps.folder} in {time.perf_counter() - started:.0f} s"
            f" ({cache_bytes(steps.folder) / 1e9:.2f} GB; later runs of these shards map it; delete it any time)")
    else:
        logger.info("%s steps mapped from %s", what, steps.folder)
    return steps


def in_memory_bytes(features: FeatureSet, inputs: tuple[str, ...]) -> int:
    """What `inputs` of every frame take in memory, as stored (face float32, context and maps float16 by default)."""
    arrays = shard_frame_arrays(features.attrs)
    per_frame = sum(arrays[name][0].itemsize * int(np.prod(arrays[name][1])) for name in inputs)
    return features.n_frames * per_frame


def fits_in_memory(features: FeatureSet, inputs: tuple[str, ...]) -> bool:
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return in_memory_bytes(features, inputs) <= PRELOAD_MEMORY_SHARE * available


def preloaded(features: FeatureSet, choice: str, inputs: tuple[str, ...], what: str,
              log: Callable[[str], None]) -> PackedSteps | None:
    """The split's packed steps for `--preload choice`, None to read the shards every epoch.

    "always" and "auto" map the steps cache, which removes reading and decompression from every
    epoch; where the cache cannot be written, "always" packs the steps in memory, and "auto"
    does so only when they fit.
    """
    if choice == "never":
        return None
    if choice == "auto" and not fits_in_memory(features, inputs):
        return preload_steps(features, inputs, what, log, fallback=False)
    return preload_steps(features, inputs, what, log)
