"""Writing one feature shard: appended clip by clip, complete only after a clean close.

The shard is written under a hidden temporary name in its final folder and renamed into
place by `close()`, so a shard file either is complete or does not exist: a crashed
writer leaves only a temporary file, which readers never take for a shard.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import secrets
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from features.failures import CORRUPT_TAG
from features.layout import FAILURES_FILE, PART_FOLDER_NAME
from features.recipe import CONTEXT_DTYPES
from features.reader import read_clip_table, stored_attrs
from features.schema import (
    CLIPS,
    COMPRESSIONS,
    CONTENT_SHA256,
    DEFAULT_COMPRESSION,
    EXTRACTOR_ATTRS,
    FACE_CROPS_STORED,
    FORMAT,
    FORMAT_VERSION,
    FRAMES,
    INDEX_NAME,
    WRITER_ATTRS,
    AudioTrack,
    ClipFeatures,
    FeatureFileError,
    array_problems,
    attr_problems,
    chunk_frames,
    clip_columns,
    content_sha256,
    decode_attrs,
    encode_attrs,
    is_shard_name,
    is_temp_name,
    project_version,
    shard_frame_arrays,
    temp_files,
    temp_name,
)
from outputs import fsync_path, is_temporary
from values import is_int


# errno values of a file system that refuses locks: NFS without lockd (ENOLCK), Lustre
# without its flock mount option (ENOSYS), and 524, Linux's internal ENOTSUPP, which some
# Lustre and Cray DVS mounts leak to user space.
LOCKS_REFUSED = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, 524}
_HDF5_LOCK_ERROR = re.compile(r"unable to lock file, errno = (\d+)")
# Held by the one process that writes shards into a folder (extract, repack).
WRITER_LOCK_FILE = ".writer.lock"
# HDF5 1.8's object versions, no newer: its object headers and superblock carry checksums,
# so a damaged header is refused when read instead of being decoded wrongly, and every
# HDF5 library since 1.8 reads the file (features/README.md, "Inside a shard").
LIBVER = ("v108", "v108")


@contextmanager
def only_writer(folder: Path) -> Iterator[None]:
    """Be the one process writing shards into `folder`; then remove the temporary files of killed writers.

    Without the lock a temporary file could be a live writer's. On file systems that refuse
    locks (NFS without lockd, some Lustre mounts) setting HDF5_USE_FILE_LOCKING=FALSE goes on
    without it, and one writer per folder is then up to the user.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open_lock_file(folder / WRITER_LOCK_FILE) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeatureFileError(
                f"another extract or repack is writing into {folder}; wait for it or use another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in LOCKS_REFUSED:
                raise
            if not locking_disabled():
                raise FeatureFileError(
                    f"the file system of {folder} refuses file locks ({exc.strerror}): set HDF5_USE_FILE_LOCKING=FALSE"
                    " to write there without locks (then run one writer per folder), or use a local --out"
                ) from None
        for leftover in files_of_killed_writers(folder):
            leftover.unlink()
        yield


def files_of_killed_writers(folder: Path) -> list[Path]:
    """Temporary shards, indexes and failures files (and an index's of a version before
    `write_atomically` named them all alike)."""
    return temp_files(folder) + [
        p for p in folder.iterdir()
        if (is_temporary(p.name) or p.name.startswith(f".{INDEX_NAME}.")) and not p.is_dir()
    ]


@contextmanager
def open_lock_file(path: Path) -> Iterator[int]:
    """The lock file's descriptor: created if missing, never truncated, never opened through a symlink
    (whose target a planted link would otherwise have us open, or create, for writing)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        hint = "it is a symbolic link: delete it" if exc.errno == errno.ELOOP else exc.strerror
        raise FeatureFileError(f"{path}: cannot be used as the writer's lock file ({hint})") from None
    try:
        yield fd
    finally:
        os.close(fd)


def writes_into_set(name: str) -> bool:
    """The names extract, repack and merge write in a feature-set folder: shards, the index, the
    failures file (and one set aside), the writers' lock, temporary files, the folders of parts."""
    return (
        is_shard_name(name) or is_temp_name(name) or is_temporary(name) or PART_FOLDER_NAME.fullmatch(name) is not None
        or name in (INDEX_NAME, FAILURES_FILE, WRITER_LOCK_FILE)
        or name.startswith((f".{INDEX_NAME}.", f"{FAILURES_FILE}{CORRUPT_TAG}"))
    )


def locking_disabled() -> bool:
    """The user said, through HDF5's own switch, that this file system has no locks."""
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE"


def shard_attrs(attrs: dict, context_dtype: str, store_face_crops: bool = False) -> dict:
    """The extractor's attributes, checked, plus the ones the writer owns."""
    missing = [key for key in EXTRACTOR_ATTRS if key not in attrs]
    if missing:
        raise ValueError(f"shard attrs lack {', '.join(missing)}")
    reserved = [key for key in WRITER_ATTRS if key in attrs]
    if reserved:
        raise ValueError(f"shard attrs {', '.join(reserved)} are set by the writer, not the caller")
    if context_dtype not in CONTEXT_DTYPES:
        raise ValueError(f"context_dtype must be one of {CONTEXT_DTYPES}, not {context_dtype!r}")
    full = dict(
        attrs,
        format=FORMAT,
        format_version=FORMAT_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        project_version=project_version(),
        context_dtype=context_dtype,
        **{FACE_CROPS_STORED: store_face_crops},
    )
    # Checked as readers will decode them (numpy scalars as Python numbers, tuples as lists),
    # with the very checks readers apply, so the writer never writes a shard they refuse.
    stored = decode_attrs(encode_attrs(full))
    problems = attr_problems(stored)
    if problems:
        raise ValueError(f"shard attrs: {'; '.join(problems)}")
    return stored


def _create(temp: Path) -> h5py.File:
    """A new HDF5 file; FeatureFileError naming the fix when the file system refuses HDF5's lock."""
    try:
        return h5py.File(temp, "w-", libver=LIBVER)  # O_EXCL: never through a file or link planted at this name
    except FileExistsError:
        raise FeatureFileError(f"{temp}: exists (planted?); the writer only writes files it creates") from None
    except OSError as exc:
        refused = _HDF5_LOCK_ERROR.search(str(exc))
        if refused and int(refused.group(1)) in LOCKS_REFUSED:
            raise FeatureFileError(
                f"{temp.parent}: the file system refuses HDF5's file lock ({exc}); set HDF5_USE_FILE_LOCKING=FALSE"
                " to write here (safe: no other process opens a writer's temporary file)"
            ) from None
        raise


class ShardWriter:
    """One shard file, written by one writer; use as a context manager.

    `add_clip` appends each clip's arrays to the shard's datasets (nothing big is held in
    memory); `close` writes the clip table and renames the file into place. If the `with`
    body raises, the temporary file is deleted and no shard appears.
    """

    def __init__(self, final_path, attrs: dict, context_dtype: str = "float16", store_face_crops: bool = False,
                 compression: str = DEFAULT_COMPRESSION):
        self._open(Path(final_path), shard_attrs(attrs, context_dtype, store_face_crops), compression)

    @classmethod
    def repacking(cls, final_path, source_attrs: dict, compression: str) -> "ShardWriter":
        """A writer for a copy of an existing shard, keeping its attributes as they are.

        `created` and `project_version` included: they describe the extraction, which a
        copy with other compression does not redo. Clips are checked as in any writer.
        """
        if (source_attrs.get("format"), source_attrs.get("format_version")) != (FORMAT, FORMAT_VERSION):
            raise ValueError(f"not the attributes of a {FORMAT} version {FORMAT_VERSION} shard")
        writer = cls.__new__(cls)
        # The content hash is the writer's to compute: the same content gives the same hash.
        attrs = {key: value for key, value in source_attrs.items() if key != CONTENT_SHA256}
        writer._open(Path(final_path), attrs, compression)
        return writer

    def _open(self, path: Path, attrs: dict, compression: str) -> None:
        self.path = path
        if not is_shard_name(self.path.name):
            raise ValueError(f"shard file names end in .h5 and do not start with '.': {self.path}")
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; complete shards are never rewritten (delete it to redo it)")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
        self.attrs = attrs
        self._classes = set(self.attrs["classes"])
        self._specs = shard_frame_arrays(self.attrs)
        self._columns = clip_columns(self.attrs)
        self._table = {column: [] for column in self._columns}
        self._temp = self.path.with_name(temp_name(self.path.name, os.getpid(), secrets.token_hex(4)))
        self._discarded = False
        self._file = _create(self._temp)
        try:
            self._file.attrs.update(encode_attrs(self.attrs))
            self._datasets = {
                name: self._file.create_dataset(
                    f"{FRAMES}/{name}",
                    shape=(0, *tail),
                    maxshape=(None, *tail),
                    dtype=dtype,
                    chunks=(chunk_frames(dtype, tail), *tail),
                    **COMPRESSIONS[compression],
                )
                for name, (dtype, tail) in self._specs.items()
            }
        except BaseException:
            self._discard()
            raise

    @property
    def n_clips(self) -> int:
        return len(self._table["clip_id"])

    @property
    def n_frames(self) -> int:
        return sum(self._table["length"])

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def add_clip(self, clip: ClipFeatures) -> None:
        """Append one clip; ValueError (nothing written) if it breaks the schema."""
        self._check_open()
        self._check_scalars(clip)
        arrays = self._stored_arrays(clip)
        start = self.n_frames
        try:
            for name, data in arrays.items():
                dataset = self._datasets[name]
                dataset.resize(start + len(data), axis=0)
                dataset[start:] = data
        except BaseException:
            # Some datasets may have grown and others not: this shard can no longer be completed.
            self._discard()
            raise
        row = dict(
            clip_id=clip.clip_id,
            label=clip.label,
            source_path=clip.source_path,
            source_fps=float(clip.source_fps),
            duration=float(clip.duration),
            start=start,
            length=len(arrays["timestamps"]),
            **(clip.audio_track.row() if "audio_codec" in self._columns else {}),
        )
        for column, value in row.items():
            self._table[column].append(value)

    def close(self) -> Path:
        """Write the clip table and the content hash, close, and rename the shard into place; returns its path."""
        if self._discarded:
            raise ValueError(f"the writer of {self.path} was discarded after an error; nothing was written")
        if not self._file:
            return self.path
        try:
            for column, dtype in self._columns.items():
                self._file.create_dataset(f"{CLIPS}/{column}", data=np.array(self._table[column], dtype=dtype))
            # Hashed as read back, i.e. exactly as readers will decode it, whatever types the caller passed.
            stored = stored_attrs(self._file)
            self._file.attrs[CONTENT_SHA256] = content_sha256(stored, read_clip_table(self._file, stored))
            self._file.close()
            # Data on disk before the name: after a power cut the shard is whole or absent.
            fsync_path(self._temp)
            os.replace(self._temp, self.path)
            fsync_path(self.path.parent)
        except BaseException:
            self._discard()
            raise
        return self.path

    def _discard(self) -> None:
        self._discarded = True
        try:
            if self._file:
                self._file.close()
        finally:
            self._temp.unlink(missing_ok=True)

    def _check_open(self) -> None:
        if not self._file:
            raise ValueError(f"the writer of {self.path} is closed")

    def _check_scalars(self, clip: ClipFeatures) -> None:
        if not isinstance(clip.clip_id, str) or not clip.clip_id:
            raise ValueError(f"clip_id must be a non-empty str, not {clip.clip_id!r}")
        if clip.clip_id in self._table["clip_id"]:
            raise ValueError(f"clip {clip.clip_id!r} is already in {self.path.name}")
        if not isinstance(clip.label, str) or (clip.label and clip.label not in self._classes):
            raise ValueError(f"clip {clip.clip_id!r}: label {clip.label!r} is neither '' nor one of the classes")
        if not isinstance(clip.source_path, str):
            raise ValueError(f"clip {clip.clip_id!r}: source_path must be a str")
        if not (math.isfinite(clip.source_fps) and clip.source_fps > 0):
            raise ValueError(f"clip {clip.clip_id!r}: source_fps must be positive, not {clip.source_fps!r}")
        if not (math.isfinite(clip.duration) and clip.duration >= 0):
            raise ValueError(f"clip {clip.clip_id!r}: duration must be >= 0 seconds, not {clip.duration!r}")
        track = clip.audio_track
        if "audio_codec" in self._columns and not (
                isinstance(track, AudioTrack) and isinstance(track.codec, str) and isinstance(track.note, str)
                and is_int(track.rate) and is_int(track.channels) and track.rate >= 0 and track.channels >= 0):
            raise ValueError(f"clip {clip.clip_id!r}: no audio track description, which this shard stores")

    def _stored_arrays(self, clip: ClipFeatures) -> dict[str, np.ndarray]:
        """The clip's arrays in the stored dtypes, after checking shapes, dtypes and the no-face policy."""
        frames = np.shape(clip.timestamps)[:1]
        if frames in ((), (0,)):
            raise ValueError(f"clip {clip.clip_id!r}: timestamps must be a 1-d array of at least one frame")
        arrays = {}
        for name, (dtype, tail) in self._specs.items():
            if getattr(clip, name) is None:
                raise ValueError(f"clip {clip.clip_id!r}: no {name}, which this shard stores")
            value = np.asarray(getattr(clip, name))
            if value.shape != (*frames, *tail):
                raise ValueError(f"clip {clip.clip_id!r}: {name} has shape {value.shape}, expected {(*frames, *tail)}")
            if (dtype.kind == "b") != (value.dtype.kind == "b") or value.dtype.kind not in "biuf":
                raise ValueError(f"clip {clip.clip_id!r}: {name} has dtype {value.dtype}, expected {dtype}")
            with np.errstate(over="ignore"):
                arrays[name] = value.astype(dtype, copy=False)
            if dtype.kind == "f" and np.isfinite(value).all() and not np.isfinite(arrays[name]).all():
                raise ValueError(f"clip {clip.clip_id!r}: {name} overflows {dtype} (store it as float32)")
        problems = array_problems(arrays)
        if problems:
            raise ValueError(f"clip {clip.clip_id!r}: {'; '.join(problems)}")
        return arrays
