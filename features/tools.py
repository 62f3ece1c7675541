"""Feature-set tools behind `cli.py features inspect|validate|merge|repack`."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from features.layout import FAILURES_FILE
from features.reader import (
    FeatureSet,
    ShardInfo,
    absolute,
    catalogue,
    check_set,
    index_folders,
    indexed_shards,
    load_index,
    open_features,
    open_shard,
    read_shard_info,
    save_index,
    set_problems,
    stored_has_face,
    write_index,
)
from features.schema import (
    CONTEXT_DTYPES,
    EXTRACTOR_ATTRS,
    FRAMES,
    INDEX_NAME,
    WRITER_ATTRS,
    ClipFeatures,
    FeatureFileError,
    array_problems,
    compression_of,
    shard_files,
    shard_frame_arrays,
    shard_name,
    temp_files,
    with_setting_defaults,
)
from features.writer import ShardWriter, only_writer

WARNING = "warning: "  # validate() lines starting with this do not make a set invalid
MAX_PROBLEMS_PER_SHARD = 20


def inspect(path) -> str:
    """A human summary: shards, clips, frames and faces, labels, context, size on disk, attributes."""
    with open_features(path) as features:
        frames = features.n_frames
        with_faces, compressions = zip(*(stored_facts(shard) for shard in features.shards))
        with_face = sum(with_faces)
        size = sum(shard.size for shard in features.shards)
        attrs = features.attrs
        per_shard = sorted({key for shard in features.shards for key in shard.attrs} - set(attrs))
        lines = [
            f"feature set   {absolute(path)}",
            f"shards        {len(features.shards)}",
            f"clips         {len(features)}",
            f"frames        {frames}, {with_face} with a face ({100 * with_face / max(frames, 1):.1f}%)",
            f"labels        {label_summary(features.labels, attrs['classes'])}",
            f"context       {attrs['context_dim']}-d {attrs['context_dtype']}",
            f"compression   {compression_summary(list(compressions))}",
            f"on disk       {size / 1e6:.1f} MB, {size / max(frames, 1):.0f} bytes per frame",
            f"failed clips  {failures_summary(path)}",
            "attributes:",
            *(f"  {key}: {describe(attrs[key])}" for key in sorted(attrs)),
        ]
    if per_shard:
        lines.append(f"  (differing between shards: {', '.join(per_shard)})")
    return "\n".join(lines)


def describe(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def stored_facts(shard: ShardInfo) -> tuple[int, str]:
    """A shard's frames with a face and how its per-frame arrays are stored (the writer gives all
    of them the same filters), from one opening of the file."""
    with open_shard(shard.path) as handle:
        try:
            with_face = int(np.count_nonzero(stored_has_face(handle[f"{FRAMES}/has_face"])))
            return with_face, compression_of(handle[f"{FRAMES}/context"])
        except (KeyError, OSError) as exc:
            raise FeatureFileError(f"{shard.path}: per-frame arrays unreadable ({exc}); run `features validate`") from exc


def compression_summary(compressions: list[str]) -> str:
    """The set's compression, or how many shards of each kind when it mixes them (a merged repacked part)."""
    counts = Counter(compressions)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} in {count} of {len(compressions)} shards" for name, count in sorted(counts.items()))


def recorded_failures(path) -> dict[Path, int]:
    """Failures file -> clips it lists, for each folder of a set (a merged folder stands for its
    parts) where the extractor recorded clips it could not extract."""
    path = absolute(path)
    if not path.is_dir():
        return {}
    counts = {folder / FAILURES_FILE: failure_rows(folder / FAILURES_FILE) for folder in source_folders(path)}
    return {file: rows for file, rows in counts.items() if rows}


def failure_rows(file: Path) -> int:
    if not file.is_file():
        return 0
    with open(file, newline="", encoding="utf-8") as rows:
        return sum(1 for _ in csv.DictReader(rows))


def failures_summary(path) -> str:
    if not absolute(path).is_dir():
        return "(see the failures.csv of the shard's folder)"
    failures = recorded_failures(path)
    if not failures:
        return "none recorded"
    listed = ", ".join(f"{count} in {file}" for file, count in failures.items())
    return f"{sum(failures.values())} ({listed})"


def label_summary(labels: dict, classes: list[str]) -> str:
    counts = Counter(labels.values())
    names = [name for name in classes if counts[name]] + sorted(k for k in counts if k is not None and k not in classes)
    parts = [f"{name} {counts[name]}" for name in names]
    if counts[None]:
        parts.append(f"unlabelled {counts[None]}")
    return ", ".join(parts) or "none"


def validate(path, progress: bool = False) -> list[str]:
    """Every problem found, one line each naming the file; empty means valid.

    Lines starting with WARNING (leftover temporary files) do not make the set invalid. Every
    value of every shard is read, so `progress` shows a bar over the shards.
    """
    path = absolute(path)
    if path.is_file():
        return shards_problems([path])[0]
    if not path.is_dir():
        return [f"{path}: no such feature file or folder"]
    index = load_index(path)
    problems, paths = [], []
    for folder in index_folders(index):
        directory = absolute(path / folder)
        if not directory.is_dir():
            problems.append(f"{directory}: shard folder listed in {path / INDEX_NAME} does not exist")
            continue
        problems += [
            f"{WARNING}{temp}: temporary file of an interrupted writer; delete it when no extraction writes here"
            for temp in temp_files(directory)
        ]
        paths += shard_files(directory)
    if not paths:
        return problems + [f"{path}: no complete feature shards (*.h5) here"]
    shard_problems_found, shards = shards_problems(paths, progress)
    return problems + shard_problems_found + index_problems(path, index, shards, paths)


def shards_problems(paths: list[Path], progress: bool = False) -> tuple[list[str], list[ShardInfo]]:
    """Problems of each shard and of the shards as one set; also the shards that could be read."""
    problems, shards = [], []
    for path in tqdm(paths, unit="shard", desc="validate", disable=not progress):
        try:
            shard = read_shard_info(path)
        except FeatureFileError as exc:
            problems.append(str(exc))
            continue
        problems += shard_problems(shard)
        shards.append(shard)
    return problems + set_problems(shards), shards


def shard_problems(shard: ShardInfo) -> list[str]:
    problems = attr_problems(shard.attrs)
    if not problems:
        try:
            with open_shard(shard.path) as handle:
                problems = layout_problems(handle, shard.attrs) or table_problems(handle, shard)
                problems = problems or clip_problems(handle, shard)
        except FeatureFileError as exc:
            return [str(exc)]
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [f"... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more"]
    return [f"{shard.path}: {problem}" for problem in problems]


def attr_problems(attrs: dict) -> list[str]:
    # json_attrs is consumed by decoding; settings added later have a value when missing.
    present = with_setting_defaults(attrs)
    missing = [key for key in WRITER_ATTRS + EXTRACTOR_ATTRS if key not in present and key != "json_attrs"]
    if missing:
        return [f"attributes missing: {', '.join(missing)}"]
    dim = attrs["context_dim"]
    if attrs["context_dtype"] not in CONTEXT_DTYPES or not isinstance(dim, int) or dim < 1:
        return [f"context_dtype {attrs['context_dtype']!r} / context_dim {dim!r} invalid"]
    return []


def layout_problems(handle: h5py.File, attrs: dict) -> list[str]:
    """Per-frame datasets present, with the schema's dtypes and shapes, all of one length."""
    problems, lengths = [], set()
    for name, (dtype, tail) in shard_frame_arrays(attrs).items():
        dataset = handle.get(f"{FRAMES}/{name}")
        if not isinstance(dataset, h5py.Dataset):
            problems.append(f"dataset /{FRAMES}/{name} missing")
        elif dataset.dtype != dtype or dataset.shape[1:] != tail:
            problems.append(f"/{FRAMES}/{name} is {dataset.dtype} {dataset.shape}, expected {dtype} (N, {tail})")
        else:
            lengths.add(dataset.shape[0])
    if len(lengths) > 1:
        problems.append(f"per-frame datasets have different lengths {sorted(lengths)}")
    return problems


def table_problems(handle: h5py.File, shard: ShardInfo) -> list[str]:
    """The clip table tiles the frame datasets exactly: no gap, no overlap, nothing left over."""
    table, problems = shard.table, []
    n_frames = handle[f"{FRAMES}/timestamps"].shape[0]
    if len({len(column) for column in table.values()}) > 1:
        return ["clip table columns have different lengths"]
    expected_start = 0
    for clip_id, start, length in zip(table["clip_id"], table["start"], table["length"]):
        if length < 1:
            problems.append(f"clip table: clip {clip_id!r} has length {length}")
        if start != expected_start:
            problems.append(
                f"clip table: clip {clip_id!r} starts at frame {start}, expected {expected_start} (gap or overlap)"
            )
        expected_start = start + length
    if sum(table["length"]) != n_frames:
        total = sum(table["length"])
        problems.append(f"clip table lengths add up to {total} frames, the frame datasets hold {n_frames}")
    duplicates = sorted(k for k, n in Counter(table["clip_id"]).items() if n > 1)
    if duplicates or not all(table["clip_id"]):
        problems.append(f"clip table: clip ids empty or repeated {duplicates}")
    classes = set(shard.attrs["classes"])
    unknown = sorted({label for label in table["label"] if label and label not in classes})
    if unknown:
        problems.append(f"clip table: labels {unknown} are not among the classes")
    return problems


def clip_problems(handle: h5py.File, shard: ShardInfo) -> list[str]:
    """Per clip: finite values, increasing timestamps, the no-face policy."""
    datasets = {name: handle[f"{FRAMES}/{name}"] for name in shard_frame_arrays(shard.attrs)}
    problems = []
    for clip_id, start, length in zip(shard.table["clip_id"], shard.table["start"], shard.table["length"]):
        try:
            arrays = {name: dataset[start : start + length] for name, dataset in datasets.items()}
        except OSError as exc:
            problems.append(f"clip {clip_id!r} unreadable ({exc}); the file is damaged")
            continue
        problems += [f"clip {clip_id!r}: {problem}" for problem in array_problems(arrays)]
    return problems


def index_problems(root: Path, index: dict | None, shards: list[ShardInfo], paths: list[Path]) -> list[str]:
    """The index lists every complete shard, and nothing else, as the shard files are now."""
    index_path = root / INDEX_NAME
    if index is None:
        return [f"{index_path}: missing or unreadable (readers rescan every shard); write it with write_index"]
    listed, present = indexed_shards(root, index), set(paths)
    problems = [f"{index_path}: lists {path}, which does not exist" for path in listed if path not in present]
    for shard in shards:
        entry = listed.get(shard.path)
        if entry is None:
            problems.append(f"{index_path}: does not list {shard.path}")
        elif (entry.size, entry.mtime_ns) != (shard.size, shard.mtime_ns):
            problems.append(f"{index_path}: stale entry for {shard.path} (the file changed after indexing)")
        elif (entry.attrs, entry.table) != (shard.attrs, shard.table):
            problems.append(f"{index_path}: entry for {shard.path} does not match the shard's attributes or clip table")
    return problems


def source_folders(folder: Path) -> list[Path]:
    """A merged folder stands for the folders its index covers; any other folder for itself."""
    return [absolute(folder / sub) for sub in index_folders(load_index(folder))]


def merge(folders: list[Path], out: Path) -> Path:
    """Write out/index.json over the shards of several folders (moving nothing); returns its path.

    Shards are referenced by paths relative to `out`, so the folders can move together.
    FeatureFileError for a folder without shards, incomparable attributes, duplicate clip ids.
    """
    out = absolute(out)
    sources, known = [], {}
    for folder in map(absolute, folders):
        if not folder.is_dir():
            raise FeatureFileError(f"{folder}: no such folder")
        known.update(indexed_shards(folder, load_index(folder)))
        sources += [source for source in source_folders(folder) if source not in sources]
    for source in sources:
        if not source.is_dir() or not shard_files(source):
            raise FeatureFileError(f"{source}: no complete feature shards (*.h5) here")
    out.mkdir(parents=True, exist_ok=True)
    relative = [Path(os.path.relpath(source, out)).as_posix() for source in sources]
    shards = catalogue(out, relative, known)
    check_set(shards)
    return save_index(out, relative, shards)


def repack(source, out, compression: str, progress: bool = False) -> Path:
    """Copy every shard of a set (a folder, a merged folder or one shard) into `out` with `compression`.

    `out` gets one shard per source shard, numbered in the set's order (so it lists the clips
    in the source's order), and its index; returns the index's path. Values, attributes and
    clip tables are the source's. A shard already in `out` that is the copy of its source
    shard with this compression is kept, so a repack that was interrupted resumes (and the
    temporary file it was writing is removed); any other shard in `out` is refused
    (FeatureFileError), as is a source that breaks the schema.
    """
    out = absolute(out)
    with open_features(source) as features, only_writer(out):
        plan = {out / shard_name(number): shard for number, shard in enumerate(features.shards)}
        done = finished_copies(out, plan, compression)
        todo = {target: shard for target, shard in plan.items() if target not in done}
        clips = sum(len(shard.table["clip_id"]) for shard in todo.values())
        with tqdm(total=clips, unit="clip", desc=f"repack ({compression})", disable=not progress) as bar:
            for target, shard in todo.items():
                repack_shard(features, shard, target, compression, bar)
    return write_index(out)


def finished_copies(out: Path, plan: dict[Path, ShardInfo], compression: str) -> set[Path]:
    """The planned shards `out` already holds from an earlier run; FeatureFileError for anything else there."""
    if index_folders(load_index(out)) != ["."]:
        raise FeatureFileError(f"{out}: holds the index of a merged set; choose an empty --out folder")
    done = set()
    for path in shard_files(out):
        source = plan.get(path)
        if source is None:
            raise FeatureFileError(f"{path}: not a shard of this repack; choose an empty --out folder")
        if not is_copy(path, source, compression):
            raise FeatureFileError(
                f"{path}: exists and is not {source.path} repacked with {compression}; delete it or choose"
                " an empty --out folder"
            )
        done.add(path)
    return done


def is_copy(path: Path, source: ShardInfo, compression: str) -> bool:
    copy = read_shard_info(path)
    return (copy.attrs, copy.table) == (source.attrs, source.table) and stored_facts(copy)[1] == compression


def repack_shard(features: FeatureSet, shard: ShardInfo, target: Path, compression: str, bar: tqdm) -> None:
    with ShardWriter.repacking(target, shard.attrs, compression) as writer:
        for clip_id in shard.table["clip_id"]:
            try:
                writer.add_clip(clip_features(features.read(clip_id)))
            except ValueError as exc:
                raise FeatureFileError(f"{shard.path}: {exc}; run `features validate` on it") from None
            bar.update()


def clip_features(clip: dict) -> ClipFeatures:
    """A clip as read back (`FeatureSet.read`), in the form the writer takes."""
    fields = {field: clip[field] for field in ClipFeatures.__dataclass_fields__ if field in clip}
    return ClipFeatures(**dict(fields, label=clip["label"] or ""))
