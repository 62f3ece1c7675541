"""Reading feature shards: one shard file, or a folder of shards through its index.

A folder's `index.json` lists its shards with their size, mtime, attributes and clip tables,
so opening a set reads one small JSON file instead of every shard. Index entries whose shard
changed, and shards the index does not list, are read from the shard files instead (a
missing or stale index costs time, never correctness).

`FeatureSet` opens no HDF5 handle until the first clip is read, and a process that did not
open a handle never uses it (it checks `os.getpid()`), so a set can be handed to forked or
spawned PyTorch DataLoader workers.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np
from h5py import h5s

from features.schema import (
    CLIP_COLUMNS,
    CLIPS,
    FORMAT,
    FORMAT_VERSION,
    FRAMES,
    INDEX_FORMAT,
    INDEX_NAME,
    STRING_COLUMNS,
    FeatureFileError,
    comparable,
    decode_attrs,
    is_shard_name,
    shard_files,
    shard_frame_arrays,
    temp_files,
)

INDEX_ENTRY_KEYS = {"path", "size", "mtime_ns", "attrs", "clips"}


@dataclass(frozen=True)
class ShardInfo:
    """What a set needs to know of one shard without reading its frames."""

    path: Path
    size: int
    mtime_ns: int
    attrs: dict
    table: dict[str, list]  # the clip table, column -> values

    @property
    def n_frames(self) -> int:
        return sum(self.table["length"])


def absolute(path) -> Path:
    """Absolute and normalised ('..' resolved), without following symlinks."""
    return Path(os.path.abspath(path))


def open_shard_file(path: Path) -> h5py.File:
    """A complete shard, read-only and without HDF5 file locking.

    Complete shards are never modified (they appear by atomic rename and are never
    reopened for writing), so the shared lock a reader takes protects nothing, while
    taking it fails on NFS and Lustre mounts without lock support.
    """
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError as exc:
        raise FeatureFileError(f"{path}: no such shard (moved or deleted since the set was opened?)") from exc
    except OSError as exc:
        raise FeatureFileError(f"{path}: cannot be opened as HDF5 ({exc}); the file is damaged or truncated") from exc


def stored_has_face(dataset: h5py.Dataset) -> np.ndarray:
    """A shard's whole has_face column.

    has_face is a one-byte HDF5 enum (FALSE=0/TRUE=1), which h5py reads through HDF5's enum
    conversion, slower than reading a clip's 1280-d context. Its stored bytes are already
    numpy bools, so they are read as they are.
    """
    file_type = dataset.id.get_type()
    if file_type.get_size() != 1:
        return dataset[()]
    rows = np.empty(dataset.shape, dtype=bool)
    dataset.id.read(h5s.ALL, h5s.ALL, rows, mtype=file_type)
    return rows


@contextmanager
def open_shard(path: Path) -> Iterator[h5py.File]:
    handle = open_shard_file(path)
    try:
        yield handle
    finally:
        handle.close()


def read_clip_table(handle: h5py.File) -> dict[str, list]:
    table = {}
    for column in CLIP_COLUMNS:
        dataset = handle[f"{CLIPS}/{column}"]
        table[column] = (dataset.asstr()[()] if column in STRING_COLUMNS else dataset[()]).tolist()
    return table


def read_shard_info(path: Path) -> ShardInfo:
    """A shard's attributes and clip table; FeatureFileError if it is not a readable shard of this format."""
    stat = path.stat()
    with open_shard(path) as handle:
        try:
            attrs = decode_attrs(handle.attrs)
        except (OSError, ValueError) as exc:
            raise FeatureFileError(f"{path}: attributes unreadable ({exc}); the file is damaged") from exc
        if attrs.get("format") != FORMAT:
            raise FeatureFileError(f"{path}: not a {FORMAT} shard (its 'format' attribute is {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise FeatureFileError(
                f"{path}: format version {attrs.get('format_version')!r}; this toolkit reads version {FORMAT_VERSION}"
            )
        try:
            table = read_clip_table(handle)
        except (KeyError, OSError) as exc:
            raise FeatureFileError(f"{path}: clip table /{CLIPS} missing or unreadable ({exc})") from exc
    return ShardInfo(path, stat.st_size, stat.st_mtime_ns, attrs, table)


def load_index(folder: Path) -> dict | None:
    """The folder's index, or None when it is absent, unreadable or of another format version."""
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if well_formed_index(index) else None


def well_formed_index(index) -> bool:
    return (
        isinstance(index, dict)
        and (index.get("format"), index.get("format_version")) == (INDEX_FORMAT, FORMAT_VERSION)
        and isinstance(index.get("folders"), list)
        and isinstance(index.get("shards"), list)
        and all(
            isinstance(entry, dict) and INDEX_ENTRY_KEYS <= entry.keys() and set(CLIP_COLUMNS) <= entry["clips"].keys()
            for entry in index["shards"]
        )
    )


def index_folders(index: dict | None) -> list[str]:
    """The shard folders an index covers, relative to the index's folder."""
    return index["folders"] if index else ["."]


def indexed_shards(folder: Path, index: dict | None) -> dict[Path, ShardInfo]:
    """Absolute shard path -> the index's entry for it."""
    if index is None:
        return {}
    return {
        absolute(folder / entry["path"]): ShardInfo(
            absolute(folder / entry["path"]), entry["size"], entry["mtime_ns"], entry["attrs"], entry["clips"]
        )
        for entry in index["shards"]
    }


def catalogue(root: Path, folders: list[str], known: dict[Path, ShardInfo]) -> list[ShardInfo]:
    """Every complete shard in `folders` (relative to `root`), from `known` where still fresh, else read."""
    shards = []
    for folder in folders:
        directory = absolute(root / folder)
        if not directory.is_dir():
            raise FeatureFileError(f"{directory}: shard folder (listed in {root / INDEX_NAME}) does not exist")
        for path in shard_files(directory):
            stat = path.stat()
            entry = known.get(path)
            fresh = entry is not None and (entry.size, entry.mtime_ns) == (stat.st_size, stat.st_mtime_ns)
            shards.append(entry if fresh else read_shard_info(path))
    return shards


def set_problems(shards: list[ShardInfo]) -> list[str]:
    """Why these shards cannot form one set: incomparable attributes, clip ids in two places."""
    problems = []
    for shard in shards[1:]:
        differences = comparable(shards[0].attrs, shard.attrs)
        if differences:
            problems.append(f"{shard.path} cannot be mixed with {shards[0].path}: {'; '.join(differences)}")
    seen = {}
    for shard in shards:
        for clip_id in shard.table["clip_id"]:
            if clip_id in seen:
                problems.append(f"clip id {clip_id!r} is in both {seen[clip_id]} and {shard.path}")
            seen.setdefault(clip_id, shard.path)
    return problems


def check_set(shards: list[ShardInfo]) -> None:
    problems = set_problems(shards)
    if problems:
        raise FeatureFileError(problems[0])


def save_index(root: Path, folders: list[str], shards: list[ShardInfo]) -> Path:
    """Write root/index.json atomically (readers never see a half-written index)."""
    index = {
        "format": INDEX_FORMAT,
        "format_version": FORMAT_VERSION,
        "folders": folders,
        "shards": [
            {
                "path": Path(os.path.relpath(shard.path, root)).as_posix(),
                "size": shard.size,
                "mtime_ns": shard.mtime_ns,
                "attrs": shard.attrs,
                "clips": shard.table,
            }
            for shard in shards
        ],
    }
    target = root / INDEX_NAME
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=root, prefix=f".{INDEX_NAME}.", delete=False) as out:
        json.dump(index, out, indent=1)
    # Temporary files are private (0600); the index is shared like the shards beside it.
    os.chmod(out.name, 0o644)
    os.replace(out.name, target)
    return target


def write_index(folder) -> Path:
    """(Re)write folder/index.json over the folder's complete shards; returns its path.

    The extractor calls this after each shard closes. Entries of unchanged shards are
    reused, so only new shards are opened. FeatureFileError if the shards cannot form one
    set (incomparable attributes, duplicate clip ids).
    """
    root = absolute(folder)
    index = load_index(root)
    shards = catalogue(root, index_folders(index), indexed_shards(root, index))
    check_set(shards)
    return save_index(root, index_folders(index), shards)


def shared_attrs(shards: list[ShardInfo]) -> dict:
    """The attributes every shard has with the same value (per-shard ones like `created` drop out)."""
    first = shards[0].attrs
    return {key: value for key, value in first.items() if all(key in s.attrs and s.attrs[key] == value for s in shards)}


def open_features(path) -> "FeatureSet":
    """A shard file or a folder of shards (through its index) as one FeatureSet."""
    path = absolute(path)
    if path.is_file():
        if not is_shard_name(path.name):
            raise FeatureFileError(f"{path}: not a complete shard (shards end in .h5; .tmp files are unfinished)")
        return FeatureSet([read_shard_info(path)])
    if not path.is_dir():
        raise FeatureFileError(f"{path}: no such feature file or folder")
    index = load_index(path)
    shards = catalogue(path, index_folders(index), indexed_shards(path, index))
    if not shards:
        unfinished = " (only temporary files of unfinished writers)" if temp_files(path) else ""
        raise FeatureFileError(f"{path}: no complete feature shards (*.h5) here{unfinished}")
    check_set(shards)
    return FeatureSet(shards)


class FeatureSet:
    """The clips of one or more comparable shards: `fs[clip_id]` -> dict of arrays and scalars.

    `fs.read(clip_id, arrays=("face", "has_face"))` reads only the per-frame arrays named.

    Each clip is one slice [start:start+length] of every per-frame dataset of its shard.
    HDF5 handles are opened on first read, per process, read-only; `close()` drops them.
    """

    def __init__(self, shards: list[ShardInfo]):
        self.shards = shards
        self.attrs = shared_attrs(shards)
        self.clip_ids = [clip_id for shard in shards for clip_id in shard.table["clip_id"]]
        self._location = {
            clip_id: (number, row)
            for number, shard in enumerate(shards)
            for row, clip_id in enumerate(shard.table["clip_id"])
        }
        self._handles: dict[int, tuple[h5py.File, dict[str, h5py.Dataset]]] = {}
        # has_face is read whole, once per shard and process, and sliced per clip: one byte per
        # frame, and a read of its own per clip cost more than the clip's face features.
        self._has_face: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    @property
    def labels(self) -> dict[str, str | None]:
        """clip_id -> label, None for unlabelled clips; reads no arrays."""
        return {
            clip_id: label or None
            for shard in self.shards
            for clip_id, label in zip(shard.table["clip_id"], shard.table["label"])
        }

    @property
    def n_frames(self) -> int:
        return sum(shard.n_frames for shard in self.shards)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __contains__(self, clip_id) -> bool:
        return clip_id in self._location

    def __repr__(self) -> str:
        return f"FeatureSet({len(self)} clips in {len(self.shards)} shards)"

    def __getitem__(self, clip_id: str) -> dict:
        return self.read(clip_id)

    def read(self, clip_id: str, arrays: Iterable[str] | None = None) -> dict:
        """`fs[clip_id]`, with only the per-frame `arrays` named (all when None) read from the shard.

        Each array is one HDF5 read (and, in gzip shards, the decompression of its chunks),
        so a caller that needs three of the eight arrays should not pay for the others;
        has_face comes from the shard's whole column, read once.
        """
        number, row = self._location[clip_id]
        shard = self.shards[number]
        start, length = shard.table["start"][row], shard.table["length"][row]
        datasets = self._datasets(number)
        names = datasets.keys() if arrays is None else arrays
        unknown = [name for name in names if name not in datasets]
        if unknown:
            raise KeyError(f"{shard.path.name} has no per-frame array {', '.join(map(repr, unknown))}")
        try:
            clip = {
                name: self._has_face_column(number)[start : start + length].copy()
                if name == "has_face"
                else datasets[name][start : start + length]
                for name in names
            }
        except OSError as exc:
            raise FeatureFileError(f"{shard.path}: clip {clip_id!r} unreadable ({exc}); the file is damaged") from exc
        clip.update(
            clip_id=clip_id,
            label=shard.table["label"][row] or None,
            source_path=shard.table["source_path"][row],
            source_fps=shard.table["source_fps"][row],
            duration=shard.table["duration"][row],
        )
        return clip

    def _has_face_column(self, number: int) -> np.ndarray:
        if number not in self._has_face:
            self._has_face[number] = stored_has_face(self._datasets(number)["has_face"])
        return self._has_face[number]

    def _datasets(self, number: int) -> dict[str, h5py.Dataset]:
        if self._pid != os.getpid():
            # Handles inherited through fork share HDF5 state with the parent: never use them here.
            self._handles = {}
            self._has_face = {}
            self._pid = os.getpid()
        if number not in self._handles:
            path = self.shards[number].path
            handle = open_shard_file(path)
            try:
                datasets = {name: handle[f"{FRAMES}/{name}"] for name in shard_frame_arrays(self.shards[number].attrs)}
            except KeyError as exc:
                handle.close()
                raise FeatureFileError(f"{path}: per-frame dataset missing ({exc}); the file is damaged") from exc
            self._handles[number] = (handle, datasets)
        return self._handles[number][1]

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle, _ in self._handles.values():
                handle.close()
        self._handles = {}
        self._has_face = {}

    def __enter__(self) -> "FeatureSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickled without handles (spawned workers, Python 3.14's forkserver default)."""
        return dict(self.__dict__, _handles={}, _has_face={})

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pid=os.getpid())
