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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from features.reader import open_features, write_index
from features.recipe import NO_AUDIO_SETTINGS
from extract.settings import DEFAULT_FPS
from features.schema import FACE_MAP_SHAPE, ClipFeatures, shard_name
from features.writer import ShardWriter
from features.labels import CHEAVD_CLASSES


DAMAGED_CONTEXT_DIM = 16  # the small sets that the hostile tests damage (conftest.py's `pristine`)


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
    face_directions = rng.normal(0, 1, (4, 128))
    context_directions = rng.normal(0, 1, (2, context_dim))
    face_directions *= strength / np.linalg.norm(face_directions, axis=1, keepdims=True) * np.sqrt(128) / 4
    context_directions *= strength / np.linalg.norm(context_directions, axis=1, keepdims=True) * np.sqrt(context_dim) / 4
    for split, count in clips.items():
        folder = root / split
        folder.mkdir(parents=True)
        with ShardWriter(folder / shard_name(0), extractor_attrs(split=split, context_dim=context_dim)) as writer:
            for i in range(count):
                if signal == "face_map_motion":
                    spot = face_directions[0] * MOTION_SPOT_GAIN
                    writer.add_clip(motion_clip(f"{split}/{i:04d}", i % 4, spot, rng, context_dim))
                    continue
                if signal == "face":
                    label = i % 4
                    face_code, context_code = face_directions[label], np.zeros(context_dim)
                else:
                    face_bit, context_bit = i % 2, (i // 2) % 2
                    label = 2 * face_bit + context_bit
                    face_code, context_code = face_directions[face_bit], context_directions[context_bit]
                writer.add_clip(planted_clip(f"{split}/{i:04d}", label, face_code, context_code, rng, context_dim))
        write_index(folder)
    return root


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
