"""Reading feature shards: one shard file, or a folder of shards through its index.

Shards come from other machines and teams, so each is checked when a set is opened, before
anything is allocated from what it states: its attributes, its datasets (stored in the file,
built-in filters only, values physically present) and its clip table (features/README.md,
"What opening a shard checks"). A folder's `index.json` is a cache of the shards' attributes
and clip tables: an entry's table is used only when the content hash the writer stored in
the shard vouches for it, else the shard's own table is read (a missing, stale or edited
index costs time, never correctness).

A process never parses a shard before a helper process has (`features/look.py`): HDF5 can
hang or crash on a crafted file, and only a process of its own can be stopped or lost then.
So `examine_shard` runs in the helper (`looked_shard`), and this process afterwards reads
only the arrays, from the very file the helper parsed (`open_looked`).

`FeatureSet` opens no HDF5 handle until the first clip is read, and a process that did not
open a handle never uses it (it checks `os.getpid()`), so a set can be handed to forked or
spawned PyTorch DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5l, h5o, h5s, h5t

from outputs import read_json_object, write_atomically
from values import shown
from features import look
from features.schema import (
    BUILT_IN_FILTERS,
    CHUNK_BYTES,
    CLIPS,
    CONTENT_SHA256,
    FORMAT_VERSION,
    FRAMES,
    INDEX_FORMAT,
    INDEX_NAME,
    MAX_CHUNK_BYTES,
    MAX_INFLATION,
    STRING_COLUMNS,
    FeatureFileError,
    attr_problems,
    AUDIO_CLIP_COLUMNS,
    CLIP_COLUMNS,
    AudioTrack,
    clip_columns,
    column_length_problems,
    comparable,
    content_sha256,
    decode_attrs,
    is_shard_name,
    shard_files,
    shard_frame_arrays,
    table_problems,
    temp_files,
)

logger = logging.getLogger(__name__)

INDEX_ENTRY_KEYS = {"path", "size", "mtime_ns", "attrs", "clips"}
# What h5py, HDF5 and json raise on a damaged or crafted file (RecursionError, from JSON
# nested too deep, is a RuntimeError): each becomes one line naming the file.
FILE_ERRORS = (OSError, LookupError, ValueError, TypeError, RuntimeError)


@dataclass(frozen=True)
class ShardInfo:
    """What a set needs to know of one shard without reading its frames."""

    path: Path
    size: int
    mtime_ns: int
    attrs: dict
    table: dict[str, list]  # the clip table, column -> values
    # The file that was checked (`file_identity`); None for an index's entry, not checked yet.
    identity: tuple | None = None

    @property
    def n_frames(self) -> int:
        return sum(self.table["length"])

    def to_json(self) -> dict:
        """As the look's helper sends it (`looked_shard`): plain JSON values, the path as text."""
        return {"path": os.fsdecode(self.path), "size": self.size, "mtime_ns": self.mtime_ns, "attrs": self.attrs,
                "table": self.table, "identity": self.identity}

    @classmethod
    def from_json(cls, data: dict) -> "ShardInfo":
        identity = data["identity"]
        return cls(Path(data["path"]), data["size"], data["mtime_ns"], data["attrs"], data["table"],
                   None if identity is None else tuple(identity))


def file_identity(stat: os.stat_result) -> tuple:
    """A file as it is now: any change to it gives it a new ctime, which no user can set."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


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
    except FILE_ERRORS as exc:
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


def open_looked(shard: ShardInfo) -> h5py.File:
    """A checked shard (`read_shard_info`), opened to read its arrays: the very file the look parsed, else
    FeatureFileError (this process never parses a file the helper has not)."""
    changed = FeatureFileError(f"{shard.path}: changed since the set was opened; open the set again")
    try:
        if file_identity(shard.path.stat()) != shard.identity:
            raise changed
    except FileNotFoundError:
        raise FeatureFileError(f"{shard.path}: no such shard (moved or deleted since the set was opened?)") from None
    handle = open_shard_file(shard.path)
    if file_identity(os.fstat(handle.id.get_vfd_handle())) != shard.identity:  # replaced between the two
        handle.close()
        raise changed
    return handle


def stored_value(attr: h5a.AttrID):
    """An attribute's value, as the writer stores every attribute: a scalar number or string,
    checked to be one before it is read (an array or compound type could claim any size)."""
    dtype = attr.dtype
    string = h5py.check_string_dtype(dtype)
    if attr.shape != () or not (dtype.kind in "biuf" or (string is not None and string.length is None)):
        raise ValueError(f"attribute {shown(attr.name.decode())} is not a scalar number or string")
    value = np.zeros((), dtype)
    attr.read(value, mtype=h5t.py_create(dtype))
    return value[()].decode() if string else value[()]


def stored_attrs(handle: h5py.File) -> dict:
    """A shard's root attributes, decoded (`decode_attrs`)."""
    root = handle.id  # h5py's AttributeManager costs more than the reads themselves
    attrs = [h5a.open(root, index=i) for i in range(h5a.get_num_attrs(root))]
    return decode_attrs({attr.name.decode(): stored_value(attr) for attr in attrs})


def read_clip_table(handle: h5py.File, attrs: dict) -> dict[str, list]:
    """The clip table of a shard of these attributes as lists (column -> values); read only once
    `table_layout_problems` found none."""
    table = {}
    for column in clip_columns(attrs):
        dataset = handle[f"{CLIPS}/{column}"]
        table[column] = (dataset.asstr()[()] if column in STRING_COLUMNS else dataset[()]).tolist()
    return table


def plain_object(handle: h5py.File, path: str) -> h5g.GroupID | h5d.DatasetID | h5t.TypeID | str:
    """The object at `path` if every link on the way is a hard link within this file; else why not.

    Soft and external links would read other objects, or other files, than the shard's own.
    """
    parent = handle.id
    for name in path.strip("/").encode().split(b"/"):
        if not parent.links.exists(name):
            return f"{path} missing"
        if parent.links.get_info(name).type != h5l.TYPE_HARD:
            return f"{path} is a link, not an object stored in this file"
        parent = h5o.open(parent, name)
    return parent


def plain_dataset(handle: h5py.File, path: str) -> h5d.DatasetID | str:
    """The dataset at `path` (`plain_object`) if it has a shape; else why not."""
    dataset = plain_object(handle, path)
    if isinstance(dataset, str):
        return dataset
    if not isinstance(dataset, h5d.DatasetID) or dataset.get_space().get_simple_extent_type() == h5s.NULL:
        return f"{path} is not a dataset of values"
    return dataset


def storage_problem(dataset: h5d.DatasetID, path: str, file_size: int) -> str | None:
    """Why reading `dataset` could run code or allocate more than the file holds; None when it cannot.

    Checked from metadata only: the values are in this file (not virtual, not external), need
    no filter beyond HDF5's built-in ones, come in bounded chunks, and are physically there.
    """
    plist = dataset.get_create_plist()
    layout = plist.get_layout()
    if layout == h5d.VIRTUAL or plist.get_external_count():
        return f"{path} takes its values from other files (virtual or external storage)"
    foreign = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    foreign = [code for code in foreign if code not in BUILT_IN_FILTERS]
    if foreign:
        return f"{path} needs HDF5 filter {foreign[0]}, not one of the built-in {', '.join(BUILT_IN_FILTERS.values())}"
    item = dataset.get_type().get_size()
    chunk = math.prod(plist.get_chunk()) * item if layout == h5d.CHUNKED else 0
    if chunk > MAX_CHUNK_BYTES:
        return f"{path} has chunks of {chunk:,} bytes, more than {MAX_CHUNK_BYTES:,}"
    claimed, stored = math.prod(dataset.shape) * item, dataset.get_storage_size()
    if stored > file_size or claimed > MAX_INFLATION * stored + CHUNK_BYTES:
        return f"{path} claims {dataset.shape} values ({claimed:,} bytes) but stores {stored:,} bytes"
    return None


def frame_problems(handle: h5py.File, attrs: dict, file_size: int) -> tuple[int, list[str]]:
    """N, the frames of a shard, and why its /frames datasets are not what its attributes imply.

    Every dataset present, with the schema's dtype and trailing shape, stored as
    `storage_problem` requires, all of one length N.
    """
    problems, lengths = [], set()
    for name, (dtype, tail) in shard_frame_arrays(attrs).items():
        path = f"/{FRAMES}/{name}"
        dataset = plain_dataset(handle, path)
        if isinstance(dataset, str):
            problems.append(dataset)
            continue
        stored_dtype, shape = dataset.dtype, dataset.shape
        if stored_dtype != dtype or shape[1:] != tail or not shape:
            problems.append(f"{path} is {stored_dtype} {shape}, expected {dtype} (N, {tail})")
        else:
            problem = storage_problem(dataset, path, file_size)
            problems += [problem] if problem else []
            lengths.add(shape[0])
    if len(lengths) > 1:
        problems.append(f"per-frame datasets have different lengths {sorted(lengths)}")
    return (lengths.pop() if len(lengths) == 1 else 0), problems


def column_kind_matches(column: str, dtype: np.dtype, expected: np.dtype) -> bool:
    """Strings stored as variable-length strings, numbers as the schema's kind (float or signed int) of any width."""
    if column in STRING_COLUMNS:
        info = h5py.check_string_dtype(dtype)
        return info is not None and info.length is None
    return dtype.kind == expected.kind


def table_layout_problems(handle: h5py.File, attrs: dict, n_frames: int, file_size: int) -> tuple[int, list[str]]:
    """The clips of a shard, and why its /clips datasets cannot be read as the clip table of a shard of these
    attributes with at most `n_frames` rows."""
    problems, rows = [], {}
    for column, dtype in clip_columns(attrs).items():
        path = f"/{CLIPS}/{column}"
        dataset = plain_dataset(handle, path)
        if isinstance(dataset, str):
            problems.append(dataset)
        elif not column_kind_matches(column, dataset.dtype, dtype) or len(dataset.shape) != 1:
            expected = "variable-length string" if column in STRING_COLUMNS else dtype
            problems.append(f"{path} is {dataset.dtype} {dataset.shape}, expected {expected} (clips,)")
        else:
            problem = storage_problem(dataset, path, file_size)
            problems += [problem] if problem else []
            rows[column] = dataset.shape[0]
    if problems:
        return 0, problems
    problems = column_length_problems(rows)
    if not problems and rows["clip_id"] > n_frames:
        problems.append(f"clip table has {rows['clip_id']} clips, more than the {n_frames} frames")
    return rows["clip_id"], problems


def vouched_for(entry: ShardInfo | None, attrs: dict, clips: int) -> bool:
    """Whether an index entry holds the shard's content as the writer wrote it: the entry's
    attributes are the shard's, its table has the shard's number of clips, and the content
    hash the writer stored in the shard is the hash of those attributes and that table."""
    stored = attrs.get(CONTENT_SHA256)
    if entry is None or stored is None:
        return False
    try:
        return (entry.attrs == attrs and len(entry.table["clip_id"]) == clips
                and content_sha256(attrs, entry.table) == stored)
    except FILE_ERRORS:
        return False


def checked_shard(handle: h5py.File, path: Path, entry: ShardInfo | None) -> tuple[ShardInfo | None, list[str]]:
    """`examine_shard` on an open shard; the problems do not name the file."""
    stat = os.fstat(handle.id.get_vfd_handle())  # the file parsed, even if another has taken its name since
    try:
        attrs = stored_attrs(handle)
    except FILE_ERRORS as exc:
        return None, [f"attributes unreadable ({exc})"]
    problems = attr_problems(attrs)
    if problems:
        return None, problems
    n_frames, problems = frame_problems(handle, attrs, stat.st_size)
    if problems:
        return None, problems
    clips, problems = table_layout_problems(handle, attrs, n_frames, stat.st_size)
    if problems:
        return None, problems
    from_index = vouched_for(entry, attrs, clips)
    table = entry.table if from_index else read_clip_table(handle, attrs)
    problems = table_problems(table, n_frames, attrs)
    stored = attrs.get(CONTENT_SHA256)
    if not (problems or from_index or stored is None or content_sha256(attrs, table) == stored):
        problems = [f"{CONTENT_SHA256} does not match the attributes and clip table: the shard was changed after it"
                    " was written (re-extract it, or delete that attribute to accept the change)"]
    return ShardInfo(path, stat.st_size, stat.st_mtime_ns, attrs, table, file_identity(stat)), problems


def examine_shard(path: Path, entry: ShardInfo | None = None) -> tuple[ShardInfo | None, list[str]]:
    """A shard checked before anything is allocated from what it states; every problem found, one line each naming it.

    Runs in the look's helper process only (`looked_shard`): it is the first parse of a file.

    Stage by stage, stopping after the first with problems (the next would read what that one
    did not vouch for): the attributes; the /frames datasets; the clip table, taken from
    `entry` (an index's) when the shard's content hash vouches for it, else read from the
    shard and checked against that hash. The ShardInfo is None when anything is wrong.
    """
    try:
        with open_shard_file(path) as handle:
            shard, problems = checked_shard(handle, path, entry)
    except FeatureFileError as exc:
        return None, [str(exc)]
    except FILE_ERRORS as exc:
        return None, [f"{path}: unreadable ({exc}); the file is damaged"]
    return (None if problems else shard), [f"{path}: {problem}" for problem in problems]


def looked_shard(path: Path, entry: ShardInfo | None = None) -> tuple[ShardInfo | None, list[str]]:
    """`examine_shard`, run in the look's helper process (`features/look.py`), where a hang or a crash of HDF5
    cannot take this process with it; a look that hangs, crashes or runs out of memory is the one problem."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return None, [f"{path}: cannot be read ({exc.strerror})"]
    request = {"path": os.fsdecode(path), "entry": None if entry is None else entry.to_json()}
    try:
        reply = look.ask(request, size)
    except look.LookFailed as exc:
        return None, [f"{path}: refused: {exc}; the file is damaged or crafted"]
    return (None if reply["shard"] is None else ShardInfo.from_json(reply["shard"])), reply["problems"]


def looked_at(request: dict) -> dict:
    """The helper's side of `looked_shard`."""
    entry = None if request["entry"] is None else ShardInfo.from_json(request["entry"])
    shard, problems = examine_shard(Path(request["path"]), entry)
    return {"shard": None if shard is None else shard.to_json(), "problems": problems}


# Shards this process has checked, by the identity of their file and the index entry offered
# with it: any change to a file gives it a new ctime, which no user can set, so a hit is the
# file as it was checked. Spares the extractor's index after each new shard, and every later
# opening of a set, all but opening the new shards.
_CHECKED: dict[tuple, ShardInfo] = {}


def read_shard_info(path: Path, entry: ShardInfo | None = None) -> ShardInfo:
    """A shard's attributes and clip table (`looked_shard`); FeatureFileError naming it and its first problem."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise FeatureFileError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        offered = None if entry is None else content_sha256(entry.attrs, entry.table)
    except FILE_ERRORS:
        offered = "unhashable"
    identity = (path, *file_identity(stat), offered)
    if identity not in _CHECKED:
        shard, problems = looked_shard(path, entry)
        if problems:
            raise FeatureFileError(problems[0])
        _CHECKED[identity] = shard
    return _CHECKED[identity]


def load_index(folder: Path) -> dict | None:
    """The folder's index; None when it is absent, unreadable, malformed or of another format version.

    An index is a cache, so ignoring it costs time only, except for its `folders`, which say
    which shards form the set: one that is not a relative path (absolute, or holding NUL) is
    refused (FeatureFileError), since ignoring it would silently open another set.
    """
    file = folder / INDEX_NAME
    index = read_json_object(file)
    if not well_formed_index(index):
        return None
    escaping = [sub for sub in index["folders"] if not isinstance(sub, str) or "\0" in sub or os.path.isabs(sub)]
    if escaping:
        raise FeatureFileError(
            f"{file}: folder {shown(escaping[0])} is not a relative path (an index's folders are relative to its own"
            " folder); fix the index or delete it"
        )
    return index


def well_formed_index(index) -> bool:
    return (
        isinstance(index, dict)
        and (index.get("format"), index.get("format_version")) == (INDEX_FORMAT, FORMAT_VERSION)
        and isinstance(index.get("folders"), list)
        and isinstance(index.get("shards"), list)
        and all(well_formed_entry(entry) for entry in index["shards"])
    )


def well_formed_entry(entry) -> bool:
    return (
        isinstance(entry, dict)
        and INDEX_ENTRY_KEYS <= entry.keys()
        and isinstance(entry["path"], str)
        and isinstance(entry["attrs"], dict)
        and isinstance(entry["clips"], dict)
        and all(isinstance(entry["clips"].get(column), list) for column in CLIP_COLUMNS)
    )


def folder_shards(directory: Path) -> list[Path]:
    try:
        return shard_files(directory)
    except OSError as exc:
        raise FeatureFileError(f"{directory}: cannot list its shards ({exc.strerror})") from None


def set_folders(root: Path, index: dict | None) -> list[str]:
    """The shard folders of the set at `root`, relative to it: its index's, and `root` itself
    whenever it holds shards, so that no index hides the shards beside it."""
    folders = index["folders"] if index else ["."]
    covered = {absolute(root / folder) for folder in folders}
    return folders if absolute(root) in covered or not folder_shards(root) else [".", *folders]


def indexed_shards(folder: Path, index: dict | None) -> dict[Path, ShardInfo]:
    """Absolute shard path -> the index's entry for it (checked against the shard before any use)."""
    if index is None:
        return {}
    return {
        absolute(folder / entry["path"]): ShardInfo(
            absolute(folder / entry["path"]), entry["size"], entry["mtime_ns"], entry["attrs"], entry["clips"]
        )
        for entry in index["shards"]
    }


def catalogue(root: Path, folders: list[str], known: dict[Path, ShardInfo]) -> list[ShardInfo]:
    """Every complete shard in `folders` (relative to `root`), each checked (`examine_shard`).

    A shard's clip table comes from its entry in `known` (an index's) when the shard's content
    hash vouches for it, else from the shard; entries that disagree with their shard are
    logged, once for all of them.
    """
    shards, disagreeing = [], 0
    for directory in dict.fromkeys(absolute(root / folder) for folder in folders):
        if not directory.is_dir():
            raise FeatureFileError(f"{directory}: shard folder (listed in {root / INDEX_NAME}) does not exist")
        for path in folder_shards(directory):
            entry = known.get(path)
            shard = read_shard_info(path, entry)
            disagreeing += entry is not None and (entry.attrs, entry.table) != (shard.attrs, shard.table)
            shards.append(shard)
    if disagreeing:
        logger.warning("%s: %d entries disagree with their shards (edited or stale); each shard's own clip table is"
                       " used", root / INDEX_NAME, disagreeing)
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
                problems.append(f"clip id {shown(clip_id)} is in both {seen[clip_id]} and {shard.path}")
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
    # A link at index.json is replaced, its target never written.
    write_atomically(target, lambda temporary: temporary.write_text(json.dumps(index, indent=1), encoding="utf-8"))
    return target


def write_index(folder) -> Path:
    """(Re)write folder/index.json over the folder's complete shards; returns its path.

    The extractor calls this after each shard closes. Entries the shards' content hashes
    vouch for are reused; other shards' clip tables are read. FeatureFileError if a shard is
    damaged or the shards cannot form one set (incomparable attributes, duplicate clip ids).
    """
    root = absolute(folder)
    index = load_index(root)
    folders = set_folders(root, index)
    shards = catalogue(root, folders, indexed_shards(root, index))
    check_set(shards)
    return save_index(root, folders, shards)


def frame_datasets(handle: h5py.File, shard: ShardInfo) -> dict[str, h5py.Dataset]:
    """The per-frame datasets of an open shard, checked again (it may have been replaced since the set was opened)."""
    try:
        n_frames, problems = frame_problems(handle, shard.attrs, shard.path.stat().st_size)
    except FILE_ERRORS as exc:
        n_frames, problems = 0, [f"unreadable ({exc}); the file is damaged"]
    if not problems and n_frames != shard.n_frames:
        problems = [f"holds {n_frames} frames, not the {shard.n_frames} it held when the set was opened (replaced?)"]
    if problems:
        raise FeatureFileError(f"{shard.path}: {problems[0]}")
    return {name: handle[f"{FRAMES}/{name}"] for name in shard_frame_arrays(shard.attrs)}


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
    shards = catalogue(path, set_folders(path, index), indexed_shards(path, index))
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
        except FILE_ERRORS as exc:
            raise FeatureFileError(
                f"{shard.path}: clip {shown(clip_id)} unreadable ({exc}); the file is damaged"
            ) from exc
        clip.update(
            clip_id=clip_id,
            label=shard.table["label"][row] or None,
            source_path=shard.table["source_path"][row],
            source_fps=shard.table["source_fps"][row],
            duration=shard.table["duration"][row],
        )
        if AUDIO_CLIP_COLUMNS.keys() <= shard.table.keys():
            clip["audio_track"] = AudioTrack.of_row({column: shard.table[column][row] for column in AUDIO_CLIP_COLUMNS})
        return clip

    def read_shard(self, number: int, arrays: Iterable[str]) -> dict[str, np.ndarray]:
        """The per-frame `arrays` of every clip of `self.shards[number]`, whole (one read each, which
        decompresses each chunk once), in the order of the shard's clip table."""
        shard = self.shards[number]
        datasets = self._datasets(number)
        try:
            return {name: self._has_face_column(number) if name == "has_face" else datasets[name][...]
                    for name in arrays}
        except FILE_ERRORS as exc:
            raise FeatureFileError(f"{shard.path}: unreadable ({exc}); the file is damaged") from exc

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
            shard = self.shards[number]
            handle = open_looked(shard)
            try:
                self._handles[number] = (handle, frame_datasets(handle, shard))
            except BaseException:
                handle.close()
                raise
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
