"""Stage 2's data: clips read from feature shards, as padded batches of aligned face and context steps.

Frames without a face (one policy, here): the paper pairs each detected face with its frame
("with each detected face, corresponding context stream contains the original frame"), so a
clip's steps are its frames WITH a face, in time order, for both streams. A clip where no
frame has a face still gets a prediction: its steps are all its frames, with face features
of zero (the stored filler). Consequences: adding faceless frames to a clip that has faces
changes nothing, and every clip of a split is scored.

Augmentation, as the paper: in training each clip starts at a random step among the first
half of its steps (so at least half of it remains); in evaluation it starts at the first.

Face maps (128x4x4 per frame, for `c3d`) are read only for models that declare
`needs_face_maps`: they take 8x the memory of the face features. They follow the same steps
as the face stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from features.reader import FeatureSet
from features.schema import FACE_DIM, FACE_MAP_SHAPE

UNLABELLED = -1

# The per-frame arrays a model's steps are built from; the rest of a clip (boxes, landmarks,
# timestamps, scores) is never read in training, which saves a read per array and clip.
STEP_ARRAYS = ("face", "context", "has_face")


# "auto" preloads a split whose arrays take at most this share of the memory available now.
PRELOAD_MEMORY_SHARE = 0.5


def in_memory_bytes(features: FeatureSet, with_face_maps: bool = False) -> int:
    """What preloading the face and context arrays (and face maps) of every frame would take."""
    context_bytes = int(features.attrs["context_dim"]) * (2 if features.attrs["context_dtype"] == "float16" else 4)
    face_map_bytes = int(np.prod(FACE_MAP_SHAPE)) * 2 if with_face_maps else 0
    return features.n_frames * (context_bytes + FACE_DIM * 4 + face_map_bytes)


def should_preload(features: FeatureSet, choice: str, with_face_maps: bool = False) -> bool:
    """Preloading removes reading and decompression from every epoch; "auto" does it when it fits."""
    if choice != "auto":
        return choice == "always"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return in_memory_bytes(features, with_face_maps) <= PRELOAD_MEMORY_SHARE * available


def step_frames_mask(has_face: np.ndarray) -> np.ndarray:
    """Which frames are the clip's steps under the faceless-frame policy above."""
    return has_face if has_face.any() else np.ones(len(has_face), bool)


def paired_steps(clip: dict) -> tuple[np.ndarray, np.ndarray]:
    """The clip's (face, context) steps under the faceless-frame policy above."""
    keep = step_frames_mask(clip["has_face"])
    return clip["face"][keep], clip["context"][keep]


@dataclass
class ClipSteps:
    clip_id: str
    face: np.ndarray  # (T, face_dim) float32
    context: np.ndarray  # (T, context_dim), float16 or float32 as stored
    label: int  # index into the classes, UNLABELLED for a clip without label
    face_map: np.ndarray | None = None  # (T, 128, 4, 4) float16, only for models that need face maps


def clip_steps(clip_id: str, clip: dict, label: int, with_face_maps: bool) -> ClipSteps:
    """A clip's steps, as every model input is built (training, evaluation, prediction)."""
    face, context = paired_steps(clip)
    face_map = clip["face_map"][step_frames_mask(clip["has_face"])] if with_face_maps else None
    return ClipSteps(clip_id, face, context, label, face_map)


class ClipDataset(Dataset):
    """One item per clip of a feature set; optionally every clip preloaded into memory."""

    def __init__(self, features: FeatureSet, classes: list[str], train: bool, preload: bool = False,
                 with_face_maps: bool = False):
        self.features = features
        self.with_face_maps = with_face_maps
        self.arrays = (*STEP_ARRAYS, "face_map") if with_face_maps else STEP_ARRAYS
        self.clip_ids = list(features.clip_ids)
        index = {name: i for i, name in enumerate(classes)}
        self.labels = [UNLABELLED if features.labels[c] is None else index[features.labels[c]] for c in self.clip_ids]
        self.train = train
        self.cache = [self._read(i) for i in range(len(self.clip_ids))] if preload else None

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _read(self, i: int) -> ClipSteps:
        clip = self.features.read(self.clip_ids[i], self.arrays)
        return clip_steps(self.clip_ids[i], clip, self.labels[i], self.with_face_maps)

    def __getitem__(self, i: int) -> ClipSteps:
        steps = self.cache[i] if self.cache is not None else self._read(i)
        if not self.train:
            return steps
        # torch's generator: seeded per DataLoader worker, so runs repeat exactly.
        start = int(torch.randint(0, len(steps.face) // 2 + 1, ()).item()) if len(steps.face) > 1 else 0
        face_map = None if steps.face_map is None else steps.face_map[start:]
        return ClipSteps(steps.clip_id, steps.face[start:], steps.context[start:], steps.label, face_map)


def collate(items: list[ClipSteps]) -> dict:
    """Left-aligned padding to the longest clip; `mask` is True on real steps; "face_map" when the items have them."""
    lengths = torch.tensor([len(item.face) for item in items])
    steps = int(lengths.max())
    batch = {
        "face": padded([item.face for item in items], steps),
        "context": padded([item.context for item in items], steps),
        "mask": torch.arange(steps)[None, :] < lengths[:, None],
        "label": torch.tensor([item.label for item in items]),
        "clip_id": [item.clip_id for item in items],
    }
    if items[0].face_map is not None:
        batch["face_map"] = padded([item.face_map for item in items], steps)
    return batch


def padded(arrays: list[np.ndarray], steps: int) -> torch.Tensor:
    """float32 (clips, steps, ...): each clip's rows first, zeros after.

    Assigning float16 rows into the float32 array converts them in the copy itself; a
    separate astype would be one more pass over the batch's largest array.
    """
    out = np.zeros((len(arrays), steps, *arrays[0].shape[1:]), np.float32)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = array
    return torch.from_numpy(out)


def make_loader(
    dataset: ClipDataset, batch_size: int, num_workers: int, seed: int, shuffle: bool
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
