"""Feature-set tools behind `cli.py features inspect|validate|merge|repack`."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

from features.failures import CorruptFailuresFile, read_failures
from features.layout import FAILURES_FILE
from features.reader import (
    FILE_ERRORS,
    FeatureSet,
    ShardInfo,
    absolute,
    catalogue,
    check_set,
    folder_shards,
    frame_datasets,
    indexed_shards,
    load_index,
    looked_shard,
    open_features,
    open_looked,
    read_shard_info,
    save_index,
    set_folders,
    set_problems,
    stored_has_face,
    write_index,
)
from features.recipe import with_setting_defaults
from features.schema import (
    AUDIO_CLIP_COLUMNS,
    CONTENT_SHA256,
    INDEX_NAME,
    NO_TRACK,
    AudioTrack,
    ClipFeatures,
    FeatureFileError,
    array_problems,
    compression_of,
    content_sha256,
    hears,
    shard_name,
    temp_files,
)
from features.writer import ShardWriter, only_writer, writes_into_set
from outputs import check_output_folder, same_file
from values import shown

WARNING = "warning: "  # validate() lines starting with this do not make a set invalid
MAX_PROBLEMS_PER_SHARD = 20
# validate() reads a clip's frames in blocks of at most this many bytes (all arrays together).
READ_BLOCK_BYTES = 32 * 1024 * 1024


def has_no_track(track: AudioTrack) -> bool:
    """Whether the clip's file holds no audio track at all."""
    return track.note == NO_TRACK


def unread_because(track: AudioTrack) -> str:
    """Why the clip's track could not be read whole (a codec not known here, damage, a video not found...); "" when
    it was, or when there is no track to read."""
    return "" if has_no_track(track) else track.note


@dataclass(frozen=True)
class AudioSummary:
    """What `features inspect` says of the voice of a set that hears, as counts: clips by their audio track as its
    file stores it (`codecs`, `rates` and `channels` count the clips whose track was found)."""

    features: str  # the recipe's audio_features
    dim: int  # values a frame
    clips: int
    frames: int
    frames_with_audio: int
    with_track: int  # clips whose file holds a track of a known codec
    without_track: int  # clips whose file holds no audio track
    codecs: dict[str, int]  # codec -> clips, most first
    rates: dict[int, int]  # sample rate as stored -> clips, most first
    channels: dict[int, int]
    unread: list[tuple[str, str]]  # (clip id, note) of each clip whose audio could not be read whole, but for no track

    def facts(self) -> list[tuple[str, str]]:
        share = 100 * self.frames_with_audio / max(self.frames, 1)
        unknown = self.clips - self.with_track - self.without_track  # a codec not known here, a video not found
        unread = len(self.unread)
        return [
            ("audio", f"{self.features}, {self.dim} values a frame"),
            ("audio frames", f"{self.frames_with_audio} of {self.frames} with audio ({share:.1f}%)"),
            ("audio tracks", f"{plural(self.with_track, 'clip')} with a track, {self.without_track} without"
                             + (f", {unknown} not known" if unknown else "")),
            ("audio codecs", counted(self.codecs, "{}")),
            ("sample rates", counted(self.rates, "{} Hz")),
            ("channels", counted(self.channels, "{}")),
            ("audio unread", f"{plural(unread, 'clip')} (`features report` lists why)" if unread else "none"),
        ]


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def counted(counts: dict, shown_as: str) -> str:
    """"aac (3 clips), mp3 (1 clip)", or "none"."""
    return ", ".join(f"{shown_as.format(value)} ({plural(count, 'clip')})" for value, count in counts.items()) or "none"


@dataclass
class InspectSummary:
    """What `features inspect` says of a set: (name, value) facts, then its attributes."""

    facts: list[tuple[str, str]]
    attributes: list[tuple[str, str]]
    differing: list[str]  # attributes whose values differ between shards (left out of `attributes`)
    audio: AudioSummary | None = None  # the voice, for a set that hears (its facts are among `facts`)

    def text(self) -> str:
        lines = [f"{name:<{KEY_WIDTH}}{value}" for name, value in self.facts]
        lines += ["attributes:", *(f"  {key}: {value}" for key, value in self.attributes)]
        if self.differing:
            lines.append(f"  (differing between shards: {', '.join(self.differing)})")
        return "\n".join(lines)


KEY_WIDTH = 14


def inspect(path) -> str:
    """A human summary: shards, clips, frames and faces, labels, context, size on disk, audio, attributes."""
    return inspect_summary(path).text()


def inspect_summary(path) -> InspectSummary:
    with open_features(path) as features:
        frames = features.n_frames
        stored = [stored_facts(shard) for shard in features.shards]
        with_face = sum(facts.with_face for facts in stored)
        size = sum(shard.size for shard in features.shards)
        attrs = features.attrs
        facts = [
            ("feature set", str(absolute(path))),
            ("shards", str(len(features.shards))),
            ("clips", str(len(features))),
            ("frames", f"{frames}, {with_face} with a face ({100 * with_face / max(frames, 1):.1f}%)"),
            ("labels", label_summary(features.labels, attrs["classes"])),
            ("context", f"{attrs['context_dim']}-d {attrs['context_dtype']}"),
            ("compression", compression_summary([facts.compression for facts in stored])),
            ("on disk", f"{size / 1e6:.1f} MB, {size / max(frames, 1):.0f} bytes per frame"),
            ("failed clips", failures_summary(path)),
        ]
        audio = audio_summary(features, sum(facts.with_audio for facts in stored)) if hears(attrs) else None
        attributes = [(key, describe(attrs[key])) for key in sorted(attrs)]
        differing = sorted({key for shard in features.shards for key in shard.attrs} - set(attrs))
    return InspectSummary(facts + (audio.facts() if audio else []), attributes, differing, audio)


def audio_summary(features: FeatureSet, frames_with_audio: int) -> AudioSummary:
    """The voice of a set that hears, from its clip tables and the frames with audio counted."""
    tracks = {clip_id: track for shard in features.shards for clip_id, track in clip_tracks(shard)}
    found = [track for track in tracks.values() if track.codec]

    def most_first(values) -> dict:
        return dict(Counter(values).most_common())

    attrs = with_setting_defaults(features.attrs)
    return AudioSummary(
        features=attrs["audio_features"],
        dim=attrs["audio_dim"],
        clips=len(tracks),
        frames=features.n_frames,
        frames_with_audio=frames_with_audio,
        with_track=len(found),
        without_track=sum(map(has_no_track, tracks.values())),
        codecs=most_first(track.codec for track in found),
        rates=most_first(track.rate for track in found),
        channels=most_first(track.channels for track in found),
        unread=[(clip_id, unread_because(track)) for clip_id, track in tracks.items() if unread_because(track)],
    )


def clip_tracks(shard: ShardInfo) -> list[tuple[str, AudioTrack]]:
    """(clip id, its audio track) of every clip of a shard that hears, from its clip table."""
    rows = zip(*(shard.table[column] for column in AUDIO_CLIP_COLUMNS))
    return [(clip_id, AudioTrack(*row)) for clip_id, row in zip(shard.table["clip_id"], rows)]


def describe(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


class StoredFacts(NamedTuple):
    with_face: int  # frames with a face
    compression: str  # how its per-frame arrays are stored (the writer gives all of them the same filters)
    with_audio: int  # frames with audio (0 in a shard that does not hear)


def stored_facts(shard: ShardInfo) -> StoredFacts:
    """What a shard's per-frame arrays say of it as a whole, from one opening of the file."""
    with open_looked(shard) as handle:
        datasets = frame_datasets(handle, shard)
        try:
            with_face = int(np.count_nonzero(stored_has_face(datasets["has_face"])))
            # has_audio is stored as has_face is, a one-byte bool; a shard that does not hear has none.
            has_audio = datasets.get("has_audio")
            with_audio = 0 if has_audio is None else int(np.count_nonzero(stored_has_face(has_audio)))
            return StoredFacts(with_face, compression_of(datasets["context"]), with_audio)
        except FILE_ERRORS as exc:
            raise FeatureFileError(f"{shard.path}: per-frame arrays unreadable ({exc}); run `features validate`") from exc


def compression_summary(compressions: list[str]) -> str:
    """The set's compression, or how many shards of each kind when it mixes them (a merged repacked part)."""
    counts = Counter(compressions)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} in {count} of {len(compressions)} shards" for name, count in sorted(counts.items()))


def recorded_failures(path) -> dict[Path, int | str]:
    """Failures file -> clips it lists (or "unreadable (why)"), for each folder of a set (a merged
    folder stands for its parts) where the extractor recorded clips it could not extract."""
    path = absolute(path)
    if not path.is_dir():
        return {}
    counts = {folder / FAILURES_FILE: failure_rows(folder / FAILURES_FILE) for folder in source_folders(path)}
    return {file: rows for file, rows in counts.items() if rows}


def failure_rows(file: Path) -> int | str:
    """The clips `file` lists, or why it cannot be read: reading a set never stops at a corrupt one."""
    try:
        return len(read_failures(file))
    except CorruptFailuresFile as exc:
        return f"unreadable ({exc.reason})"


def failures_summary(path) -> str:
    if not absolute(path).is_dir():
        return "(see the failures.csv of the shard's folder)"
    failures = recorded_failures(path)
    if not failures:
        return "none recorded"
    counts = {file: rows for file, rows in failures.items() if isinstance(rows, int)}
    listed = ", ".join(f"{count} in {file}" for file, count in counts.items())
    parts = [f"{sum(counts.values())} ({listed})"] if counts else []
    return "; ".join(parts + [f"{rows} in {file}" for file, rows in failures.items() if isinstance(rows, str)])


def label_counts(labels: dict, classes: list[str]) -> dict[str, int]:
    """Clips per label (`labels`: clip id -> label or None), in the order of `classes`, then labels
    outside them, then the unlabelled."""
    counts = Counter(labels.values())
    names = [name for name in classes if counts[name]] + sorted(k for k in counts if k is not None and k not in classes)
    shown = {name: counts[name] for name in names}
    if counts[None]:
        shown["unlabelled"] = counts[None]
    return shown


def label_summary(labels: dict, classes: list[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in label_counts(labels, classes).items()) or "none"


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
    try:
        index = load_index(path)
        folders = set_folders(path, index)
    except FeatureFileError as exc:
        return [str(exc)]
    problems, paths = [], []
    for directory in dict.fromkeys(absolute(path / folder) for folder in folders):
        if not directory.is_dir():
            problems.append(f"{directory}: shard folder listed in {path / INDEX_NAME} does not exist")
            continue
        paths += folder_shards(directory)
        problems += [
            f"{WARNING}{temp}: temporary file of an interrupted writer; delete it when no extraction writes here"
            for temp in temp_files(directory)
        ]
    if not paths:
        return problems + [f"{path}: no complete feature shards (*.h5) here"]
    shard_problems_found, shards = shards_problems(paths, progress)
    return problems + shard_problems_found + index_problems(path, index, shards, paths)


def shards_problems(paths: list[Path], progress: bool = False) -> tuple[list[str], list[ShardInfo]]:
    """Problems of each shard and of the shards as one set; also the shards that could be read."""
    problems, shards = [], []
    for path in tqdm(paths, unit="shard", desc="validate", disable=not progress):
        shard, found = looked_shard(path)
        if shard is not None:
            found = clip_problems(shard)
            shards.append(shard)
        if len(found) > MAX_PROBLEMS_PER_SHARD:
            found = found[:MAX_PROBLEMS_PER_SHARD] + [f"{path}: ... and {len(found) - MAX_PROBLEMS_PER_SHARD} more"]
        problems += found
    return problems + set_problems(shards), shards


def clip_problems(shard: ShardInfo) -> list[str]:
    """Per clip of a checked shard: finite values, increasing timestamps, the no-face policy."""
    problems = []
    try:
        with open_looked(shard) as handle:
            datasets = frame_datasets(handle, shard)
            rows = block_rows(datasets)
            for clip_id, start, length in zip(shard.table["clip_id"], shard.table["start"], shard.table["length"]):
                try:
                    found = clip_value_problems(datasets, start, length, rows)
                except FILE_ERRORS as exc:
                    found = [f"unreadable ({exc}); the file is damaged"]
                problems += [f"{shard.path}: clip {shown(clip_id)}: {problem}" for problem in found]
    except FeatureFileError as exc:
        return [str(exc)]
    return problems


def block_rows(datasets: dict[str, h5py.Dataset]) -> int:
    """Frames read at once: READ_BLOCK_BYTES of all the arrays together, so that memory stays bounded however
    long a clip is and however well its values compress (one frame at least, a few MB at most)."""
    frame_bytes = sum(dataset.dtype.itemsize * math.prod(dataset.shape[1:]) for dataset in datasets.values())
    return max(1, READ_BLOCK_BYTES // frame_bytes)


def clip_value_problems(datasets: dict[str, h5py.Dataset], start: int, length: int, rows: int) -> list[str]:
    """`array_problems` of the clip at [start, start + length), read `rows` frames at a time."""
    problems, previous = [], np.empty(0)
    for first in range(start, start + length, rows):
        arrays = {name: dataset[first : min(first + rows, start + length)] for name, dataset in datasets.items()}
        # The last timestamp of the block before goes first, so the increase is checked across blocks too.
        arrays["timestamps"], previous = np.concatenate([previous, arrays["timestamps"]]), arrays["timestamps"][-1:]
        problems += [problem for problem in array_problems(arrays) if problem not in problems]
    return problems


def index_problems(root: Path, index: dict | None, shards: list[ShardInfo], paths: list[Path]) -> list[str]:
    """The index covers every folder of shards, lists every complete shard and nothing else, and
    holds each shard's attributes and clip table as the shard does."""
    index_path = root / INDEX_NAME
    if index is None:
        return [f"{index_path}: missing or unreadable (readers rescan every shard); write it with write_index"]
    listed, present = indexed_shards(root, index), set(paths)
    problems = [f"{index_path}: lists {path}, which does not exist" for path in listed if path not in present]
    problems += hidden_shard_problems(root, index)
    for shard in shards:
        entry = listed.get(shard.path)
        if entry is None:
            problems.append(f"{index_path}: does not list {shard.path}")
        elif (entry.attrs, entry.table) != (shard.attrs, shard.table):
            problems.append(f"{index_path}: entry for {shard.path} does not match the shard's attributes or clip table")
    return problems


def hidden_shard_problems(root: Path, index: dict) -> list[str]:
    """Folders holding shards that the index's folders leave out: the set's own folder and those just below it."""
    covered = {absolute(root / folder) for folder in index["folders"]}
    problems = []
    for folder in [root, *sorted(child for child in root.iterdir() if child.is_dir())]:
        hidden = [] if folder in covered else folder_shards(folder)
        if hidden:
            problems.append(
                f"{root / INDEX_NAME}: hides {len(hidden)} shards in {folder} (its folders leave it out); add them with"
                f" `python cli.py features merge {folder} --out {root}`"
            )
    return problems


def source_folders(folder: Path) -> list[Path]:
    """The folders of the set at `folder`: its index's (a merged folder stands for its parts), and
    `folder` itself when it holds shards."""
    return [absolute(folder / sub) for sub in set_folders(folder, load_index(folder))]


def merge(folders: list[Path], out: Path, overwrite: bool = False) -> Path:
    """Write out/index.json over the shards of several folders (moving nothing); returns its path.

    A set already at `out` (its own shards, the folders of its index) stays in the merged set
    with all of its shards, so merging into a set adds to it and re-running a merge changes
    nothing. Shards are referenced by paths relative to `out`, so the folders can move
    together. FeatureFileError for a folder without shards, incomparable attributes,
    duplicate clip ids; OutputError for an `out` holding more than a feature set's files,
    unless `overwrite`.
    """
    out = check_output_folder(absolute(out), "features merge", overwrite, writes_into_set)
    given = list(map(absolute, folders))
    missing = [folder for folder in given if not folder.is_dir()]
    if missing:
        raise FeatureFileError(f"{missing[0]}: no such folder")
    existing = [out] if out.is_dir() and (load_index(out) is not None or folder_shards(out)) else []
    sources, known = [], {}
    for folder in existing + given:
        known.update(indexed_shards(folder, load_index(folder)))
        sources += [source for source in source_folders(folder) if source not in sources]
    for source in sources:
        if not source.is_dir() or not folder_shards(source):
            raise FeatureFileError(f"{source}: no complete feature shards (*.h5) here")
    out.mkdir(parents=True, exist_ok=True)
    relative = [Path(os.path.relpath(source, out)).as_posix() for source in sources]
    shards = catalogue(out, relative, known)
    check_set(shards)
    return save_index(out, relative, shards)


def repack(source, out, compression: str, progress: bool = False, overwrite: bool = False) -> Path:
    """Copy every shard of a set (a folder, a merged folder or one shard) into `out` with `compression`.

    `out` gets one shard per source shard, numbered in the set's order (so it lists the clips
    in the source's order), and its index; returns the index's path. Values, attributes and
    clip tables are the source's. A shard already in `out` that is the copy of its source
    shard with this compression is kept, so a repack that was interrupted resumes (and the
    temporary file it was writing is removed); any other shard in `out` is refused
    (FeatureFileError), as is a source that breaks the schema, and `out` holding other files
    than a feature set's (OutputError) unless `overwrite`.
    """
    out = check_output_folder(absolute(out), "features repack", overwrite, writes_into_set)
    if same_file(out, source) or absolute(source).parent == out:
        raise FeatureFileError(f"--out {out} is the source set; choose another folder for the copy")
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
    if set_folders(out, load_index(out)) != ["."]:
        raise FeatureFileError(f"{out}: holds the index of a merged set; choose an empty --out folder")
    done = set()
    for path in folder_shards(out):
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
    """The copy's content hash is that of the source's attributes and clip table (which may have no hash: older)."""
    copy = read_shard_info(path)
    same = copy.attrs.get(CONTENT_SHA256) == content_sha256(source.attrs, source.table)
    return same and stored_facts(copy).compression == compression


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
