"""The feature-file format: every name, dtype, shape and attribute both stages rely on.

`features/README.md` is the written schema for people; this module is the same schema for
code. The writer, the reader and the tools import their constants from here only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np

from errors import UserError
from features.recipe import NO_AUDIO, RECIPE_ATTRS, attr_differences, value_problems, with_setting_defaults
from values import is_int, is_positive_number, shown

FORMAT = "caca-rnn-features"
FORMAT_VERSION = 1
INDEX_FORMAT = "caca-rnn-features-index"
INDEX_NAME = "index.json"
SHARD_SUFFIX = ".h5"
TEMP_TAG = ".tmp-"

FRAMES = "frames"
CLIPS = "clips"

FACE_DIM = 128
FACE_MAP_SHAPE = (128, 4, 4)
LANDMARK_SHAPE = (5, 2)

# Per-frame arrays whose dtype and trailing shape never vary; `context` is added by
# `frame_arrays` because its width and dtype come from the shard's attributes.
FIXED_FRAME_ARRAYS = {
    "face": (np.dtype("float32"), (FACE_DIM,)),
    "face_map": (np.dtype("float16"), FACE_MAP_SHAPE),
    "timestamps": (np.dtype("float64"), ()),
    "has_face": (np.dtype("bool"), ()),
    "box": (np.dtype("float32"), (4,)),
    "score": (np.dtype("float32"), ()),
    "landmarks": (np.dtype("float32"), LANDMARK_SHAPE),
}
FRAME_ARRAY_NAMES = ("face", "face_map", "context", "timestamps", "has_face", "box", "score", "landmarks")
# Present in shards whose recipe hears (recipe.FeatureRecipe.hears): the voice around each frame, and
# whether any audio covered it (where not, the row is zeros).
AUDIO_ARRAY_NAMES = ("audio", "has_audio")
FINITE_ARRAYS = ("face", "face_map", "context", "timestamps", "score", "audio")
# Optional: the main face's crop per frame (uint8 RGB, face_crop_size square), stored only
# when the extractor was asked to; the root attribute FACE_CROPS_STORED says so.
FACE_CROP = "face_crop"
FACE_CROPS_STORED = "face_crops_stored"

STRING_COLUMNS = ("clip_id", "label", "source_path", "audio_codec", "audio_note")  # any shard's
CLIP_COLUMNS = {
    **{column: h5py.string_dtype() for column in STRING_COLUMNS[:3]},  # variable-length UTF-8
    "source_fps": np.dtype("float64"),
    "duration": np.dtype("float64"),
    "start": np.dtype("int64"),
    "length": np.dtype("int64"),
}
# The clip's audio track, in shards whose recipe hears: its codec, sample rate and channels as stored
# ("", 0, 0 without a track), and a note: "" when it was read whole, else what kept it from being.
AUDIO_CLIP_COLUMNS = {
    "audio_codec": h5py.string_dtype(),
    "audio_rate": np.dtype("int64"),
    "audio_channels": np.dtype("int64"),
    "audio_note": h5py.string_dtype(),
}

# gzip (deflate) is built into every HDF5 library, so any team's tool reads the shards;
# shuffle groups the bytes of each float by significance, which deflate then packs far
# better. "none" stores the same values in more space and reads them without decompressing,
# for training from a local copy (`features repack`). HDF5 records the filters per dataset,
# so readers need no setting and shards of either kind mix in one set. Measurements behind
# both are in features/README.md.
COMPRESSIONS = {
    "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True},
    "none": {"compression": None, "compression_opts": None, "shuffle": False},
}
DEFAULT_COMPRESSION = "gzip"
CHUNK_BYTES = 256 * 1024
MAX_CHUNK_FRAMES = 1024

# What a shard may claim, checked before anything is read or allocated, so that a file
# cannot make a reader allocate in proportion to a number it merely states. deflate packs
# at most about 1032:1, so a dataset whose values would take more than MAX_INFLATION times
# the bytes it stores (plus one writer chunk of slack) claims data it does not hold. A
# chunk is decompressed whole, so its size is bounded too (the writer's are at most
# CHUNK_BYTES or one row). The largest context backbone on offer gives 25088 values a
# frame and the extractor crops faces to 128 px; the caps leave room for others.
MAX_INFLATION = 1100
MAX_CHUNK_BYTES = 8 * 1024 * 1024
MAX_FACE_CROP_SIZE = 1024
# The filters every HDF5 library has built in (HDF5's filter ids): any other would make
# HDF5 look for a plugin, i.e. load code named by the file.
BUILT_IN_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32"}

CONTENT_SHA256 = "content_sha256"
WRITER_ATTRS = (
    "format", "format_version", "created", "project_version", "context_dtype", FACE_CROPS_STORED, "json_attrs",
    CONTENT_SHA256,
)
# Writer attributes a valid shard may lack: json_attrs is consumed by decoding, and shards
# written before the content hash existed have none.
OPTIONAL_WRITER_ATTRS = ("json_attrs", CONTENT_SHA256)
# Where the clips came from: differs between sets that are still comparable (train and test).
SOURCE_ATTRS = ("split", "manifest", "manifest_sha256")
# How the features were made (`recipe.FeatureRecipe`) must be equal for two sets to be mixed or
# compared; the extractor gives the recipe's attributes but those the writer owns (context_dtype).
EXTRACTOR_ATTRS = SOURCE_ATTRS + tuple(key for key in RECIPE_ATTRS if key not in WRITER_ATTRS)
COMPARABILITY_KEYS = ("format_version", *RECIPE_ATTRS)


class FeatureFileError(UserError):
    """A problem with feature files the user can fix (damaged shard, wrong folder); names the file."""


@dataclass(frozen=True)
class ClipFeatures:
    """One clip's features as the extractor hands them to `ShardWriter.add_clip`.

    Arrays have T >= 1 rows, one per sampled frame. Rows of frames without a face are
    filler: `face`, `face_map` and `score` zero, `box` and `landmarks` NaN; `has_face`
    is the truth. Float arrays are stored in the schema's dtypes (context in the
    writer's `context_dtype`).
    """

    clip_id: str
    label: str  # "" for an unlabelled clip
    source_path: str
    source_fps: float
    duration: float
    timestamps: np.ndarray  # (T,) seconds from the start of the source
    has_face: np.ndarray  # (T,) bool
    face: np.ndarray  # (T, 128)
    face_map: np.ndarray  # (T, 128, 4, 4)
    context: np.ndarray  # (T, context_dim)
    box: np.ndarray  # (T, 4) x1, y1, x2, y2 in source-frame pixels
    score: np.ndarray  # (T,)
    landmarks: np.ndarray  # (T, 5, 2) x, y in source-frame pixels
    face_crop: np.ndarray | None = None  # (T, S, S, 3) uint8, only for writers that store crops
    # Only for writers whose recipe hears: the voice around each frame (zeros where has_audio is
    # false), and the clip's track.
    audio: np.ndarray | None = None  # (T, audio_dim) float32
    has_audio: np.ndarray | None = None  # (T,) bool
    audio_track: AudioTrack | None = None


# The note of a clip whose file has no audio track.
NO_TRACK = "no audio track"


@dataclass(frozen=True)
class AudioTrack:
    """A clip's audio track as its file stores it, and whether it could be read."""

    codec: str = ""  # "" without a track
    rate: int = 0  # samples a second as stored
    channels: int = 0
    note: str = ""  # "" when read whole; else why not ("no audio track", "damaged audio at 3.20 s: ...")

    @classmethod
    def of_row(cls, row: dict) -> AudioTrack:
        """From a clip's row of the clip table (a shard's AUDIO_CLIP_COLUMNS)."""
        return cls(row["audio_codec"], row["audio_rate"], row["audio_channels"], row["audio_note"])

    def row(self) -> dict:
        return {"audio_codec": self.codec, "audio_rate": self.rate, "audio_channels": self.channels,
                "audio_note": self.note}


def frame_arrays(
    context_dim: int, context_dtype: str, face_crop_size: int | None = None, audio_dim: int = 0
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape after the frame axis) of every per-frame dataset, in schema order.

    With `face_crop_size`, the optional stored face crops are included; with `audio_dim`, the voice.
    """
    specs = dict(FIXED_FRAME_ARRAYS, context=(np.dtype(context_dtype), (context_dim,)))
    arrays = {name: specs[name] for name in FRAME_ARRAY_NAMES}
    if face_crop_size is not None:
        arrays[FACE_CROP] = (np.dtype("uint8"), (face_crop_size, face_crop_size, 3))
    if audio_dim:
        arrays.update(audio=(np.dtype("float32"), (audio_dim,)), has_audio=(np.dtype("bool"), ()))
    return arrays


def hears(attrs: dict) -> bool:
    """Whether a shard of these attributes holds the voice (older shards, without audio settings, do not)."""
    return with_setting_defaults(attrs)["audio_features"] != NO_AUDIO


def shard_frame_arrays(attrs: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The per-frame datasets a shard with these attributes holds."""
    crop_size = attrs["face_crop_size"] if attrs.get(FACE_CROPS_STORED) else None
    audio_dim = with_setting_defaults(attrs)["audio_dim"] if hears(attrs) else 0
    return frame_arrays(attrs["context_dim"], attrs["context_dtype"], crop_size, audio_dim)


def clip_columns(attrs: dict) -> dict[str, np.dtype]:
    """The clip table's columns of a shard with these attributes: name -> dtype."""
    return {**CLIP_COLUMNS, **AUDIO_CLIP_COLUMNS} if hears(attrs) else dict(CLIP_COLUMNS)


def chunk_frames(dtype: np.dtype, tail: tuple[int, ...]) -> int:
    """Frames per chunk: about CHUNK_BYTES, so a chunk fits HDF5's default 1 MiB chunk cache."""
    row_bytes = dtype.itemsize * math.prod(tail)
    return max(1, min(MAX_CHUNK_FRAMES, CHUNK_BYTES // row_bytes))


def compression_of(dataset: h5py.Dataset) -> str:
    """The COMPRESSIONS name of a stored dataset's filters, or HDF5's own description of others."""
    stored = {"compression": dataset.compression, "compression_opts": dataset.compression_opts,
              "shuffle": dataset.shuffle}
    names = [name for name, settings in COMPRESSIONS.items() if settings == stored]
    return names[0] if names else f"{dataset.compression} {dataset.compression_opts}, shuffle {dataset.shuffle}"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}{SHARD_SUFFIX}"


def shard_number(name: str) -> int | None:
    """The number in a name `shard_name` made; None for any other name (a shard may be named anything ending in .h5)."""
    match = re.fullmatch(rf"shard-(\d+){re.escape(SHARD_SUFFIX)}", name)
    return int(match.group(1)) if match else None


def temp_name(final_name: str, pid: int, token: str) -> str:
    """Hidden, and not ending in SHARD_SUFFIX, so no reader ever takes it for a shard."""
    return f".{final_name}{TEMP_TAG}{pid}-{token}"


def is_shard_name(name: str) -> bool:
    return name.endswith(SHARD_SUFFIX) and not name.startswith(".")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and f"{SHARD_SUFFIX}{TEMP_TAG}" in name


def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_shard_name(p.name) and p.is_file())


def temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_temp_name(p.name))


def project_version() -> str:
    return version("caca-rnn")


def encode_attrs(attrs: dict) -> dict:
    """Attributes as HDF5 can store them: scalars as they are, dicts and lists as JSON text.

    `json_attrs` names the JSON-encoded keys, so decoding never has to guess.
    """
    nested = sorted(key for key, value in attrs.items() if isinstance(value, (dict, list, tuple)))
    encoded = {key: json.dumps(value, sort_keys=True) if key in nested else value for key, value in attrs.items()}
    encoded["json_attrs"] = json.dumps(nested)
    return encoded


def decode_attrs(stored) -> dict:
    """HDF5 attributes (h5py AttributeManager or dict) -> plain Python values, JSON decoded.

    ValueError (or TypeError, RecursionError) when `json_attrs` or a value it names is not JSON.
    """
    values = {key: value.item() if isinstance(value, np.generic) else value for key, value in stored.items()}
    nested = json.loads(values.pop("json_attrs", "[]"))
    if not (isinstance(nested, list) and all(isinstance(key, str) for key in nested)):
        raise ValueError(f"json_attrs is {shown(nested)}, not a JSON list of attribute names")
    return {key: json.loads(value) if key in nested else value for key, value in values.items()}


def content_sha256(attrs: dict, table: dict[str, list]) -> str:
    """The hash of a shard's content as readers decode it: its attributes (but this hash) and clip table.

    Canonical JSON (sorted keys, fixed separators), so the same values always give the same
    hash, whichever process computes it and whatever order they were stored in.
    """
    content = {"attrs": {key: value for key, value in attrs.items() if key != CONTENT_SHA256}, "clips": table}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# What each clip-table column holds once read from a shard or decoded from an index.
COLUMN_VALUES = {
    **{column: (lambda value: isinstance(value, str), "a string") for column in STRING_COLUMNS},
    "source_fps": (lambda value: isinstance(value, float), "a float"),
    "duration": (lambda value: isinstance(value, float), "a float"),
    "start": (is_int, "an integer"),
    "length": (is_int, "an integer"),
    "audio_rate": (lambda value: is_int(value) and value >= 0, "an integer >= 0"),
    "audio_channels": (lambda value: is_int(value) and value >= 0, "an integer >= 0"),
}


def attr_problems(attrs: dict) -> list[str]:
    """Why decoded shard attributes are not what readers rely on; empty when they are.

    Format and version first (nothing else is meaningful in another format), then every
    attribute present, and the types and values the code uses.
    """
    if attrs.get("format") != FORMAT:
        return [f"not a {FORMAT} shard (its 'format' attribute is {shown(attrs.get('format'))})"]
    version = attrs.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        return [f"format version {shown(version)}; this toolkit reads version {FORMAT_VERSION}"]
    present = with_setting_defaults(attrs)
    required = [key for key in WRITER_ATTRS if key not in OPTIONAL_WRITER_ATTRS] + list(EXTRACTOR_ATTRS)
    missing = [key for key in required if key not in present]
    if missing:
        return [f"attributes missing: {', '.join(missing)}"]
    problems = [
        f"attribute {shown(key)} is a {type(value).__name__}, not a string, number, list or dict"
        for key, value in attrs.items()
        if not isinstance(value, (str, int, float, list, dict))
    ]
    return problems + stored_value_problems(present)


def stored_value_problems(attrs: dict) -> list[str]:
    """The attribute values the code computes with, checked (the recipe's rules, and whether crops are stored);
    `attrs` has every required key."""
    problems = value_problems(attrs)
    crop = attrs["face_crop_size"]
    if not isinstance(attrs[FACE_CROPS_STORED], bool):
        problems.append(f"{FACE_CROPS_STORED} {shown(attrs[FACE_CROPS_STORED])} is not a bool")
    elif attrs[FACE_CROPS_STORED] and not (is_int(crop) and 1 <= crop <= MAX_FACE_CROP_SIZE):
        problems.append(f"face_crop_size {shown(crop)} is not an int from 1 to {MAX_FACE_CROP_SIZE}")
    return problems


def table_problems(table: dict[str, list], n_frames: int, attrs: dict) -> list[str]:
    """Why a clip table (column -> list of values) does not describe a shard of `n_frames` frames and these
    attributes.

    Empty when it does. Its columns, their lengths and value types first (nothing else is
    meaningful without them), then the tiling of [0, n_frames), unique non-empty ids, known
    labels, and the source's frame rate and duration.
    """
    expected = clip_columns(attrs)
    if set(table) != set(expected):
        return [f"clip table has columns {shown(sorted(table))}, not {shown(sorted(expected))}"]
    problems = column_length_problems({column: len(values) for column, values in table.items()})
    if problems:
        return problems
    for column in expected:
        holds, kind = COLUMN_VALUES[column]
        wrong = [value for value in table[column] if not holds(value)]
        if wrong:
            return [f"clip table: {column} holds {shown(wrong[0])}, not {kind}"]
    classes = attrs["classes"]
    problems = tiling_problems(table, n_frames)
    duplicates = sorted(k for k, n in Counter(table["clip_id"]).items() if n > 1)
    if duplicates or not all(table["clip_id"]):
        problems.append(f"clip table: clip ids empty or repeated {shown(duplicates)}")
    known = set(classes)
    unknown = sorted({label for label in table["label"] if label and label not in known})
    if unknown:
        problems.append(f"clip table: labels {shown(unknown)} are not among the classes")
    for clip_id, fps, duration in zip(table["clip_id"], table["source_fps"], table["duration"]):
        if not (is_positive_number(fps) and 0 <= duration < math.inf):
            problems.append(
                f"clip table: clip {shown(clip_id)} has source_fps {shown(fps)} and duration {shown(duration)}"
            )
    return problems


def column_length_problems(lengths: dict[str, int]) -> list[str]:
    """The clip table's columns (name -> rows) have one length, one row per clip."""
    if len(set(lengths.values())) <= 1:
        return []
    return [f"clip table columns have different lengths ({', '.join(f'{k} {n}' for k, n in lengths.items())})"]


def tiling_problems(table: dict[str, list], n_frames: int) -> list[str]:
    """The clips tile [0, n_frames) in order: no gap, no overlap, nothing left over, none empty."""
    problems, expected_start = [], 0
    for clip_id, start, length in zip(table["clip_id"], table["start"], table["length"]):
        if length < 1:
            problems.append(f"clip table: clip {shown(clip_id)} has length {length}")
        if start != expected_start:
            problems.append(
                f"clip table: clip {shown(clip_id)} starts at frame {start}, expected {expected_start} (gap or overlap)"
            )
        expected_start = start + length
    total = sum(table["length"])
    if total != n_frames:
        problems.append(f"clip table lengths add up to {total} frames, the frame datasets hold {n_frames}")
    return problems


def comparable(attrs_a: dict, attrs_b: dict) -> list[str]:
    """Human-readable differences in COMPARABILITY_KEYS; empty when the two sets can be mixed.

    Takes attribute dicts as found (a checkpoint's may lack some): a key one lacks is a difference.
    """
    return attr_differences(attrs_a, attrs_b, COMPARABILITY_KEYS)


def face_problems(has_face: np.ndarray, arrays: dict[str, np.ndarray]) -> list[str]:
    """Breaches of the no-face policy: the mask is the truth, the filler must match it."""
    absent, present = ~has_face, has_face
    problems = []
    if np.any(arrays["face"][absent] != 0) or np.any(arrays["face_map"][absent] != 0):
        problems.append("face/face_map rows are not all zero where has_face is false")
    if FACE_CROP in arrays and np.any(arrays[FACE_CROP][absent] != 0):
        problems.append("face_crop is not all zero where has_face is false")
    if np.any(arrays["score"][absent] != 0):
        problems.append("score is not 0 where has_face is false")
    for name in ("box", "landmarks"):
        nan = np.isnan(arrays[name]).reshape(len(has_face), -1)
        if not nan[absent].all():
            problems.append(f"{name} is not NaN where has_face is false")
        if nan[present].any():
            problems.append(f"{name} has NaN where has_face is true")
    return problems


def audio_filler_problems(arrays: dict[str, np.ndarray]) -> list[str]:
    """Breaches of the no-audio policy: where has_audio is false, the audio row is zeros."""
    if "audio" not in arrays or not np.any(arrays["audio"][~arrays["has_audio"]] != 0):
        return []
    return ["audio rows are not all zero where has_audio is false"]


def array_problems(arrays: dict[str, np.ndarray]) -> list[str]:
    """Non-finite values and non-increasing timestamps within one clip, and the filler of frames without a face
    or audio."""
    problems = [f"{name} has NaN or inf" for name in FINITE_ARRAYS
                if name in arrays and not np.isfinite(arrays[name]).all()]
    if np.any(np.diff(arrays["timestamps"]) <= 0):
        problems.append("timestamps are not strictly increasing")
    return problems + face_problems(arrays["has_face"], arrays) + audio_filler_problems(arrays)
