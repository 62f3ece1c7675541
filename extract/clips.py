"""Stage 1's core, clips to features: decode each clip in windows, embed them (`embed.py`), and
yield each clip's features or its failure, in order; and the recipe those features follow.

The batch job (`pipeline.py`) stores what this yields in shards; `predict` classifies it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from extract import faces, face_cnn, retinaface, weights
from extract.ahead import ahead
from extract.audio import Heard, TrackReader, framer_for
from extract.context_cnn import CONTEXT_SIZE, IMAGENET_MEAN, IMAGENET_STD, ContextCNN
from extract.embed import ClipInProgress, Embedder, Networks, StageError, finished
from extract.face_cnn import FaceCNN
from extract.retinaface import RetinaFaceDetector
from extract.settings import (
    AUDIO_FEATURES, BACKBONES, FACE_BACKBONE, RECIPE_CHOICES, VARIANTS, ExtractSettings, NetworkChoice,
    detector_backbone_of,
)
from extract.video import VideoError, VideoInfo, probe, sample_frames
from features.failures import Failure, file_stamp, one_line
from features.labels import CHEAVD_CLASSES
from features.recipe import NO_AUDIO_SETTINGS, FeatureRecipe
from features.schema import ClipFeatures
from manifests.manifest import ClipEntry

logger = logging.getLogger(__name__)
# Windows of sampled frames the decoder may run ahead of the networks: enough to keep both
# busy, few enough that memory stays flat (a window is --batch-size frames, see WINDOW_BYTES).
DECODE_AHEAD = 1
# A window also holds at most this many bytes of frames (one frame at least): 64 frames of an
# 8K clip are 6.4 GB, and about three windows are alive at once (decoded ahead, being stacked,
# being detected). Windows of 640x360 to 1280x720 clips keep their 64 frames (177 MB at 720p),
# so their batches, and features, are unchanged; 1080p gets 43 frames, 4K 10, 8K 2.
WINDOW_BYTES = 256 << 20


def recipe_of(settings: ExtractSettings) -> FeatureRecipe:
    """How `settings` make features on this machine: their choices, the code's constants and the
    hashes of this machine's weights, whichever clips they read."""
    return made_here({name: getattr(settings, name) for name in RECIPE_CHOICES}, settings.detector_backbone)


def remade_here(recipe: FeatureRecipe) -> FeatureRecipe:
    """How this machine makes features by `recipe`'s choices (its code's constants and weights may differ)."""
    return made_here({name: getattr(recipe, name) for name in RECIPE_CHOICES}, detector_backbone_of(recipe.detector))


def made_here(choices: dict, detector_backbone: str) -> FeatureRecipe:
    """The recipe of these choices (RECIPE_CHOICES) and this detector, with this code's constants and this
    machine's weights."""
    context = BACKBONES[choices["context_backbone"]]
    unhashed = FeatureRecipe(
        **{**choices, **audio_settings(choices)},
        face_crop_size=faces.FACE_CROP_SIZE,
        face_crop_scale=faces.FACE_CROP_SCALE,
        context_size=CONTEXT_SIZE,
        detector=VARIANTS[detector_backbone].weight_name,
        detector_weights_sha256="",
        detector_max_side=faces.DETECT_MAX_SIDE,
        main_face={"switch_penalty": faces.SWITCH_PENALTY, "size_weight": faces.SIZE_WEIGHT,
                   "no_face_gain": faces.NO_FACE_GAIN},
        face_backbone=FACE_BACKBONE,
        face_weights_sha256="",
        context_weights_sha256="",
        context_dim=context.feature_dim,
        context_pooling=context.pooling,
        normalisation={
            "detector": "BGR minus per-channel means " + str(retinaface.BGR_MEAN),
            "face": f"ITU-R 601 gray, {face_cnn.FACE_CNN_INPUT_SIZE}x{face_cnn.FACE_CNN_INPUT_SIZE}, (x/255-0.5)*2",
            "context": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        },
        classes=list(CHEAVD_CLASSES),
    )
    hashes = {key: weights.sha256_of(weights.verified_path(name)) for key, name in weight_names(unhashed).items()}
    return replace(unhashed, **hashes)


def audio_settings(choices: dict) -> dict:
    """The recipe's audio settings for these choices: those of the audio features chosen (the window by default
    the frame step, so that the windows tile the clip), or all 0 without audio."""
    kind = AUDIO_FEATURES.get(choices["audio_features"])
    if kind is None:
        return NO_AUDIO_SETTINGS
    return {"audio_features": kind.name, "audio_rate": choices["audio_rate"], "audio_frame": kind.frame,
            "audio_hop": kind.hop, "audio_bands": kind.bands,
            "audio_window": choices["audio_window"] or 1 / choices["fps"], "audio_dim": 2 * kind.values}


def weight_names(recipe: FeatureRecipe) -> dict[str, str]:
    """Each weight-hash field of `recipe` -> the registry name of the weights it is the hash of."""
    return {
        "detector_weights_sha256": recipe.detector,
        "face_weights_sha256": recipe.face_backbone,
        "context_weights_sha256": BACKBONES[recipe.context_backbone].weight_name,
    }


def load_networks(choice: NetworkChoice) -> Networks:
    return Networks(
        detector=RetinaFaceDetector(choice.detector_backbone, device=choice.device,
                                    score_threshold=choice.detector_threshold, precision=choice.precision),
        face_cnn=FaceCNN(device=choice.device, precision=choice.precision),
        context_cnn=ContextCNN(choice.context_backbone, device=choice.device, precision=choice.precision),
    )


@dataclass(frozen=True)
class Window:
    """Consecutive sampled frames of one clip, (W, H, W, 3) uint8, and their timestamps."""

    entry: ClipEntry
    frames: np.ndarray
    stamps: list[float]


@dataclass(frozen=True)
class ClipEnd:
    """Every window of the clip has been decoded (and its audio track read, when the recipe hears)."""

    entry: ClipEntry
    info: VideoInfo
    heard: Heard | None


@dataclass(frozen=True)
class DecodeFailed:
    """The clip's decoding failed, after the windows decoded before the error."""

    entry: ClipEntry
    error: Exception


# What the decoder yields, in order: each clip's windows, then its end or its failure.
Decoded = Window | ClipEnd | DecodeFailed


def _windows(path: Path, fps: float, size: int,
             audio: TrackReader | None = None) -> Iterator[tuple[np.ndarray, list[float]]]:
    """The clip's sampled frames in windows of `size` frames, or fewer when they would exceed WINDOW_BYTES; its
    audio track, in the same pass, to `audio`."""
    frames, stamps = [], []
    for sampled in sample_frames(path, fps=fps, audio=audio):
        frames.append(sampled.image)
        stamps.append(sampled.timestamp)
        if len(frames) >= min(size, max(1, WINDOW_BYTES // sampled.image.nbytes)):
            yield np.stack(frames), stamps
            frames, stamps = [], []
    if frames:
        yield np.stack(frames), stamps


def _decoded(entries: list[ClipEntry], recipe: FeatureRecipe, size: int) -> Iterator[Decoded]:
    """Every clip's windows of sampled frames, then its end (with its voice, when the recipe hears), or its
    failure."""
    framer = framer_for(recipe) if recipe.hears else None
    for entry in entries:
        try:
            info = probe(entry.path)
            audio = TrackReader(recipe, framer) if framer is not None else None
            stamps = []
            for frames, window_stamps in _windows(entry.path, recipe.fps, size, audio):
                stamps += window_stamps
                yield Window(entry, frames, window_stamps)
            if not stamps:
                raise VideoError(f"{entry.path}: no frames could be decoded")
        except Exception as exc:  # whatever this clip's file does, only this clip fails
            yield DecodeFailed(entry, exc)
            continue
        yield ClipEnd(entry, info, audio.heard(stamps) if audio is not None else None)


def embed_clips(
    entries: list[ClipEntry], networks: Networks, recipe: FeatureRecipe, batch_size: int, keep_crops: bool = False
) -> Iterator[ClipFeatures | Failure]:
    """Decode, detect and embed clips as `recipe` says, with `networks` loaded for it; yields each clip's
    features, or its failure, in manifest order. `batch_size` sampled frames queue across clips for the
    networks; `keep_crops` keeps each frame's face crop.

    Decoding runs DECODE_AHEAD windows ahead in a thread, overlapping the networks. An error
    in one clip (decoding, detection and crops, the CNN call its frames are part of, the
    choice of its main face and the assembly of its arrays) is that clip's Failure, and the
    other clips go on.
    """
    embedder = Embedder(networks, batch_size, keep_crops=keep_crops, detect_every=recipe.detect_every)
    in_flight: deque[ClipInProgress] = deque()
    clip = None
    for step in ahead(_decoded(entries, recipe, batch_size), DECODE_AHEAD):
        if clip is None:
            clip = ClipInProgress(step.entry)
        if isinstance(step, Window):
            embedder.add_window(clip, step.frames, step.stamps)
            continue
        if isinstance(step, DecodeFailed):
            embedder.fail(clip, "decode", step.error)
        else:
            clip.info, clip.heard = step.info, step.heard
        clip.all_windows_added = True
        in_flight.append(clip)
        clip = None
        yield from map(_result, finished(in_flight))
    embedder.flush()
    yield from map(_result, finished(in_flight))


def _result(clip: ClipInProgress) -> ClipFeatures | Failure:
    """A finished clip's features, with its main face chosen, or its failure."""
    entry = clip.entry
    if clip.failed is None:
        try:
            return ClipFeatures(
                clip_id=entry.clip_id,
                label=entry.label or "",
                source_path=str(entry.path),
                source_fps=clip.info.fps,
                duration=clip.info.duration,
                **clip.assemble(),
                **heard_fields(clip.heard),
            )
        except Exception as exc:  # this clip's detections or features: only this clip fails
            clip.failed = StageError("assemble", exc)
    return clip_failure(entry.clip_id, entry.path, clip.failed)


def heard_fields(heard: Heard | None) -> dict:
    """ClipFeatures' audio fields of a clip's voice (none when the recipe does not hear)."""
    if heard is None:
        return {}
    return {"audio": heard.audio, "has_audio": heard.has_audio, "audio_track": heard.track}


def clip_failure(clip_id: str, path: Path, failed: StageError) -> Failure:
    """The failure of one clip, logged with its traceback (shown with -v). A VideoError names the
    file and the problem already; other errors say their type too."""
    exc = failed.exception
    error = one_line(str(exc) if isinstance(exc, VideoError) else f"{type(exc).__name__}: {exc}")
    logger.info("%s: failed at stage %s: %s", clip_id, failed.stage, error, exc_info=exc)
    return Failure(clip_id, str(path), failed.stage, error, file_stamp(path))
