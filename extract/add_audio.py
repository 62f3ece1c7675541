"""The voice for a feature set made without it, without running the CNNs again (`features add-audio`).

A team that extracted faces and context last month (hours of CNN time) reads the audio tracks
of the same videos and gets a new set: every shard copied into the output folder with its
arrays, attributes and clips as they were, plus each clip's voice at its stored frame times
(extract/audio.py: the same features as an extraction that heard from the start, since the
frames' times are the same) and the audio settings in its recipe. The result is a set like any
other: validated, merged, repacked and shared as such, never mixed with the source (their
recipes differ).

Each clip's video is found through the manifest by its clip id (a shard's own source paths
are another machine's, and a crafted shard could name any file). A clip whose video is missing
from the manifest or the disk, unreadable, or not the video that was extracted (another
duration or frame rate than the shard records), keeps every feature it had and gets no audio,
its `audio_note` saying why. Only the audio is decoded: this costs a small part of an
extraction (benchmarks/README.md).

The output folder must be new, empty or an earlier add-audio of the same set, which resumes:
a shard already there that records the source shard it came from (`audio_added_to`, the source
shard's content hash) and the same audio recipe is kept.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from extract.audio import Heard, TrackReader, framer_for
from extract.clips import audio_settings
from extract.settings import AUDIO_RATE, check_audio_features
from extract.video import VideoError, probe, read_audio
from features.reader import FeatureSet, ShardInfo, absolute, open_features, read_shard_info, write_index
from features.recipe import AUDIO_FIELDS, FeatureRecipe
from features.schema import CONTENT_SHA256, AudioTrack, FeatureFileError, hears, shard_name
from features.tools import clip_features, stored_facts
from features.writer import ShardWriter, only_writer, writes_into_set
from manifests.manifest import read_manifest
from outputs import check_output_folder, same_file

# A shard made by add-audio records the source shard it came from (its content hash): provenance, not a setting.
AUDIO_ADDED_TO = "audio_added_to"
# A video whose duration or frame rate differs from what the shard records by more than this is another video.
SAME_VIDEO_TOLERANCE = 0.05


def heard_recipe(recipe: FeatureRecipe, audio_features: str, audio_window: float | None) -> FeatureRecipe:
    """`recipe` with the voice: the audio settings an extraction with these choices would record."""
    choices = {"audio_features": audio_features, "audio_rate": AUDIO_RATE, "audio_window": audio_window,
               "fps": recipe.fps}
    return dataclasses.replace(recipe, **audio_settings(choices))


def add_audio(source, out, manifest: Path, audio_features: str, audio_window: float | None = None,
              progress: bool = False, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write `out`: the set at `source` with each clip's voice added; returns out's index. FeatureFileError for a set
    that hears already or an `out` holding other shards; OutputError for an `out` holding other files, unless
    `overwrite`."""
    check_audio_features(audio_features)
    out = check_output_folder(absolute(out), "features add-audio", overwrite, writes_into_set)
    if same_file(out, source) or absolute(source).parent == out:
        raise FeatureFileError(f"--out {out} is the source set; choose another folder for the set with audio")
    videos = {entry.clip_id: entry.path for entry in read_manifest(manifest, check_files=False)}
    with open_features(source) as features, only_writer(out):
        if hears(features.attrs):
            raise FeatureFileError(f"{absolute(source)} holds the voice already (audio_features"
                                   f" {features.attrs['audio_features']!r})")
        recipe = heard_recipe(FeatureRecipe.from_attrs(features.attrs), audio_features, audio_window)
        plan = {out / shard_name(number): shard for number, shard in enumerate(features.shards)}
        todo = {target: shard for target, shard in plan.items() if not done_before(target, shard, recipe)}
        clips = sum(len(shard.table["clip_id"]) for shard in todo.values())
        log(f"{len(plan) - len(todo)} of {len(plan)} shards done before; adding the voice to {clips} clips")
        framer = framer_for(recipe)
        with tqdm(total=clips, unit="clip", desc="add audio", disable=not progress) as bar:
            for target, shard in todo.items():
                write_with_audio(features, shard, target, recipe, videos, framer, bar)
    return write_index(out)


def done_before(target: Path, source: ShardInfo, recipe: FeatureRecipe) -> bool:
    """Whether `target` is the shard an earlier add-audio of the same set and recipe wrote from `source`; an
    unfinished one left only a temporary file. FeatureFileError for another shard there."""
    if not target.exists():
        return False
    copy = read_shard_info(target)
    if copy.attrs.get(AUDIO_ADDED_TO) != source.attrs.get(CONTENT_SHA256) or \
            FeatureRecipe.from_attrs(copy.attrs) != recipe:
        raise FeatureFileError(f"{target}: exists and is not {source.path} with this voice added; delete it or"
                               " choose an empty --out folder")
    return True


def write_with_audio(features: FeatureSet, shard: ShardInfo, target: Path, recipe: FeatureRecipe,
                     videos: dict[str, Path], framer, bar: tqdm) -> None:
    attrs = {**shard.attrs, **{key: getattr(recipe, key) for key in AUDIO_FIELDS},
             AUDIO_ADDED_TO: shard.attrs.get(CONTENT_SHA256, "")}
    with ShardWriter.repacking(target, attrs, stored_facts(shard)[1]) as writer:
        for row, clip_id in enumerate(shard.table["clip_id"]):
            clip = clip_features(features.read(clip_id))
            expected = (shard.table["duration"][row], shard.table["source_fps"][row])
            heard = heard_at(videos.get(clip_id), clip.timestamps, expected, recipe, framer)
            writer.add_clip(dataclasses.replace(clip, audio=heard.audio, has_audio=heard.has_audio,
                                                audio_track=heard.track))
            bar.update()


def heard_at(path: Path | None, timestamps: np.ndarray, expected: tuple[float, float], recipe: FeatureRecipe,
             framer) -> Heard:
    """The voice of the clip's video at `path` at its stored frame `timestamps`; none, with the reason, where the
    video is missing, unreadable or not the one extracted (`expected`: its duration and frame rate)."""
    if path is None:
        return silent(timestamps, recipe, "no video for the clip in the manifest")
    try:
        info = probe(path)
    except VideoError as exc:
        return silent(timestamps, recipe, str(exc))
    if not all(math.isclose(found, wanted, rel_tol=0, abs_tol=SAME_VIDEO_TOLERANCE * max(1, wanted))
               for found, wanted in zip((info.duration, info.fps), expected)):
        return silent(timestamps, recipe, f"{path} is not the video that was extracted ({info.duration:.2f} s at"
                                          f" {info.fps:.2f} fps, the set's {expected[0]:.2f} s at {expected[1]:.2f})")
    reader = TrackReader(recipe, framer)
    reader.set_video_origin(info.origin)
    try:
        read_audio(path, reader)
    except VideoError as exc:
        return silent(timestamps, recipe, str(exc))
    return reader.heard(list(timestamps))


def silent(timestamps: np.ndarray, recipe: FeatureRecipe, why: str) -> Heard:
    return Heard(np.zeros((len(timestamps), recipe.audio_dim), np.float32), np.zeros(len(timestamps), bool),
                 AudioTrack(note=why))
