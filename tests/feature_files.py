"""Feature sets for tests, written through `features/` like the extractor writes them.

`write_planted_set` plants a label signal in chosen streams, so tests can tell which models
learn from which stream:
- "face": the class is a direction added to every face feature; context is noise.
- "both": two bits, one in the face stream and one in the context stream; the class is
  their combination, so either stream alone can reach at most half the clips right.
- "face_map_motion": the class is the direction a bright spot moves across the 4x4 face maps
  (left->right, right->left, top->bottom, bottom->top, one cell a step, wrapping, from a
  random cell). Any one frame shows a spot at a random cell and the face vector (the maps'
  spatial mean) is the same for every class, so only a model of the maps over time learns it.
- "voice": a set extracted with audio (`HEARING`); two bits, one in the face stream and one in
  the audio stream, the class their combination, so a model that only sees or only hears
  reaches at most half the clips right; context is noise. A quarter of the frames have no
  audio (zeros, has_audio false), never a clip's first frame, which always has a face.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from features.reader import open_features, write_index
from features.recipe import NO_AUDIO_SETTINGS
from extract.settings import DEFAULT_FPS
from features.schema import FACE_MAP_SHAPE, AudioTrack, ClipFeatures, shard_name
from features.writer import ShardWriter
from features.labels import CHEAVD_CLASSES
from train.models import DEFAULT_AUDIO_DIM


DAMAGED_CONTEXT_DIM = 16  # the small sets that the hostile tests damage (conftest.py's `pristine`)
# The audio settings of a set extracted with the default log-mel features (pass them to `extractor_attrs`),
# as wide as the models that hear are built by default.
HEARING = dict(audio_features="logmel", audio_rate=16000, audio_frame=0.025, audio_hop=0.01, audio_bands=64,
               audio_window=0.2, audio_dim=DEFAULT_AUDIO_DIM)
AUDIO_TRACK = AudioTrack(codec="aac", rate=44100, channels=2, note="")


def extractor_attrs(**changes) -> dict:
    attrs = dict(
        split="train",
        manifest="manifests/train.csv",
        manifest_sha256="0" * 64,
        fps=5.0,
        face_crop_size=128,
        face_crop_scale=1.2,
        context_size=224,
        face_backbone="mini-xception-fer2013",
        face_weights_sha256="59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
        context_backbone="squeezenet1_1",
        context_weights_sha256="random-init",
        context_dim=64,
        context_pooling="adaptive average pooling to 512x7x7",
        detector="retinaface-mobilenet0.25",
        detector_weights_sha256="2979b33ffafda5d74b6948cd7a5b9a7a62f62b949cef24e95fd15d2883a65220",
        detector_threshold=0.5,
        detector_max_side=640,
        detect_every=1,
        main_face={"switch_penalty": 4.0, "size_weight": 0.5, "no_face_gain": -6.0},
        normalisation={
            "face": "(x/255-0.5)*2",
            "context": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        },
        classes=list(CHEAVD_CLASSES),
        precision="float32",
        **NO_AUDIO_SETTINGS,
    )
    return dict(attrs, **changes)


def planted_clip(clip_id: str, label: int, face_code: np.ndarray, context_code: np.ndarray, rng, context_dim: int,
                 faceless: float = 0.2) -> ClipFeatures:
    """A clip of 4-12 frames carrying `face_code` in its face features and `context_code` in its context."""
    frames = int(rng.integers(4, 13))
    has_face = rng.random(frames) > faceless
    has_face[0] = True
    face = (rng.normal(0, 1, (frames, 128)) + face_code).astype(np.float32)
    context = (rng.normal(0, 1, (frames, context_dim)) + context_code).astype(np.float32)
    return clip_of(clip_id, CHEAVD_CLASSES[label], has_face, face, context)


def clip_of(clip_id: str, label: str, has_face: np.ndarray, face: np.ndarray, context: np.ndarray) -> ClipFeatures:
    """A clip sampled at the default fps from `face` and `context` features: its face maps are the
    face features spread over the 4x4 cells, its box, landmarks and score fixed, and where a frame
    has no face everything of the face is filled as the extractor fills it."""
    frames = len(has_face)
    face = face.copy()
    face_map = np.repeat(face[:, :, None], int(np.prod(FACE_MAP_SHAPE[1:])), axis=2).reshape(frames, *FACE_MAP_SHAPE)
    face_map = face_map.astype(np.float16)
    box = np.tile(np.float32([10, 10, 60, 60]), (frames, 1))
    landmarks = np.full((frames, 5, 2), 30, np.float32)
    score = np.full(frames, 0.99, np.float32)
    absent = ~has_face
    face[absent], face_map[absent], score[absent], box[absent], landmarks[absent] = 0, 0, 0, np.nan, np.nan
    return ClipFeatures(
        clip_id=clip_id, label=label, source_path=f"{clip_id}.mp4", source_fps=25.0,
        duration=frames / DEFAULT_FPS, timestamps=np.arange(frames) / DEFAULT_FPS, has_face=has_face, face=face,
        face_map=face_map, context=context, box=box, score=score, landmarks=landmarks,
    )


def with_voice(clip: ClipFeatures, audio: np.ndarray, has_audio: np.ndarray) -> ClipFeatures:
    """The clip with its voice, for a set extracted with audio: `audio` rows zeroed where `has_audio` is
    false, as the extractor fills them."""
    audio = np.where(has_audio[:, None], audio, 0).astype(np.float32)
    return dataclasses.replace(clip, audio=audio, has_audio=has_audio, audio_track=AUDIO_TRACK)


def voiced_clip(clip: ClipFeatures, voice_code: np.ndarray, rng) -> ClipFeatures:
    """`clip` with noise plus `voice_code` in its audio, a quarter of its frames but the first without audio."""
    frames = len(clip.has_face)
    has_audio = rng.random(frames) > 0.25
    has_audio[0] = True
    return with_voice(clip, rng.normal(0, 1, (frames, len(voice_code))) + voice_code, has_audio)


MOTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (row, column) step per class
# Weaker spots let c3d memorise the per-clip noise of 128 train clips instead of the motion.
MOTION_SPOT_GAIN = 12


def motion_clip(clip_id: str, label: int, spot_code: np.ndarray, rng, context_dim: int) -> ClipFeatures:
    """A clip whose face maps carry a spot moving as MOTIONS[label]; every frame has a face."""
    clip = planted_clip(clip_id, label, np.zeros(128), np.zeros(context_dim), rng, context_dim, faceless=0.0)
    frames = len(clip.face)
    start, step = rng.integers(0, 4, 2), np.array(MOTIONS[label])
    cells = (start + np.arange(frames)[:, None] * step) % 4
    face_map = np.repeat(clip.face[:, :, None, None], 16, axis=2).reshape(frames, 128, 4, 4)
    face_map[np.arange(frames), :, cells[:, 0], cells[:, 1]] += spot_code
    face = face_map.mean(axis=(2, 3)).astype(np.float32)
    return dataclasses.replace(clip, face=face, face_map=face_map.astype(np.float16))


def write_planted_set(root: Path, signal: str, clips: dict[str, int], seed: int = 0, context_dim: int = 64,
                      strength: float = 1.5) -> Path:
    """Write ROOT/SPLIT/ for each split in `clips` (split -> number of clips); returns ROOT."""
    rng = np.random.default_rng(seed)
    directions = {"face": rng.normal(0, 1, (4, 128)), "context": rng.normal(0, 1, (2, context_dim))}
    hearing = HEARING if signal == "voice" else {}
    if hearing:  # drawn only here, so that the sets of the other signals stay as they were
        directions["audio"] = rng.normal(0, 1, (2, DEFAULT_AUDIO_DIM))
    for vectors in directions.values():
        vectors *= strength / np.linalg.norm(vectors, axis=1, keepdims=True) * np.sqrt(vectors.shape[1]) / 4
    for split, count in clips.items():
        folder = root / split
        folder.mkdir(parents=True)
        attrs = extractor_attrs(split=split, context_dim=context_dim, **hearing)
        with ShardWriter(folder / shard_name(0), attrs) as writer:
            for i in range(count):
                writer.add_clip(planted(signal, f"{split}/{i:04d}", i, directions, rng, context_dim))
        write_index(folder)
    return root


def planted(signal: str, clip_id: str, i: int, directions: dict[str, np.ndarray], rng,
            context_dim: int) -> ClipFeatures:
    """Clip number `i` of a set planted with `signal` (the module notes), from each stream's class directions."""
    if signal == "face_map_motion":
        return motion_clip(clip_id, i % 4, directions["face"][0] * MOTION_SPOT_GAIN, rng, context_dim)
    if signal == "face":
        return planted_clip(clip_id, i % 4, directions["face"][i % 4], np.zeros(context_dim), rng, context_dim)
    face_bit, other_bit = i % 2, (i // 2) % 2
    label = 2 * face_bit + other_bit
    if signal == "voice":
        clip = planted_clip(clip_id, label, directions["face"][face_bit], np.zeros(context_dim), rng, context_dim)
        return voiced_clip(clip, directions["audio"][other_bit], rng)
    return planted_clip(clip_id, label, directions["face"][face_bit], directions["context"][other_bit], rng,
                        context_dim)


def read_all(folder: Path) -> dict[str, dict]:
    """Every clip of a feature folder, by id."""
    with open_features(folder) as features:
        return {clip_id: features[clip_id] for clip_id in features.clip_ids}


def assert_same_clips(result: dict, reference: dict) -> None:
    """The same clips, labels and sources, and every stored array equal bit for bit (same dtype).

    Only runs on the same torch threads compare so: on other threads torch sums in another
    order (tests/threads.py).
    """
    assert sorted(result) == sorted(reference)
    for clip_id, expected in reference.items():
        got = result[clip_id]
        assert got.keys() == expected.keys(), clip_id
        for name, value in expected.items():
            if isinstance(value, np.ndarray):
                assert got[name].dtype == value.dtype, (clip_id, name)
                np.testing.assert_array_equal(got[name], value, err_msg=f"{clip_id} {name}")
            else:
                assert got[name] == value, (clip_id, name)
