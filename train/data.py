"""Stage 2's data: clips read from feature shards, as padded batches of aligned face and context steps.

Frames without a face (one policy, here): the paper pairs each detected face with its frame
("with each detected face, corresponding context stream contains the original frame"), so a
clip's steps are its frames WITH a face, in time order, for both streams. A clip where no
frame has a face still gets a prediction: its steps are all its frames, with face features
of zero (the stored filler). Consequences: adding faceless frames to a clip that has faces
changes nothing, and every clip of a split is scored.

Augmentation, as the paper: in training each clip starts at a random step among the first
half of its steps (so at least half of it remains); in evaluation it starts at the first.

Each model declares the per-frame inputs it reads (`model.inputs`, a subset of
`STEP_INPUTS`), and only those are read from the shards, with `has_face` to choose the steps:
Face-RNN never reads the context features, `c3d` reads only the face maps (128x4x4 per
frame, 8x the memory of the face features). Every input follows the same steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from features.reader import FeatureSet
from features.schema import shard_frame_arrays
from train.config import UNLABELLED

# The per-frame arrays (shard datasets) a model can take as steps, by name: `model(inputs, mask)`
# with `inputs` the arrays of `model.inputs`, listed in this order. The rest of a clip (boxes,
# landmarks, timestamps, scores) is never read in training, which saves a read per array and clip.
STEP_INPUTS = ("face", "context", "face_map")


# "auto" preloads a split whose arrays take at most this share of the memory available now.
PRELOAD_MEMORY_SHARE = 0.5


def in_memory_bytes(features: FeatureSet, inputs: tuple[str, ...]) -> int:
    """What preloading `inputs` of every frame would take (face float32, context and maps as stored)."""
    arrays = shard_frame_arrays(features.attrs)
    per_frame = sum(arrays[name][0].itemsize * int(np.prod(arrays[name][1])) for name in inputs)
    return features.n_frames * per_frame


def should_preload(features: FeatureSet, choice: str, inputs: tuple[str, ...]) -> bool:
    """Preloading removes reading and decompression from every epoch; "auto" does it when it fits."""
    if choice != "auto":
        return choice == "always"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return in_memory_bytes(features, inputs) <= PRELOAD_MEMORY_SHARE * available


def step_frames_mask(has_face: np.ndarray) -> np.ndarray:
    """Which frames are the clip's steps under the faceless-frame policy above."""
    return has_face if has_face.any() else np.ones(len(has_face), bool)


@dataclass
class ClipSteps:
    clip_id: str
    inputs: dict[str, np.ndarray]  # name in STEP_INPUTS -> (T, ...) rows: face float32, context and face_map as stored
    label: int  # index into the classes, UNLABELLED for a clip without label

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def from_step(self, start: int) -> "ClipSteps":
        return ClipSteps(self.clip_id, {name: rows[start:] for name, rows in self.inputs.items()}, self.label)


def clip_steps(clip_id: str, clip: dict, label: int, inputs: tuple[str, ...]) -> ClipSteps:
    """A clip's steps of `inputs`, as every model input is built (training, evaluation, prediction)."""
    keep = step_frames_mask(clip["has_face"])
    return ClipSteps(clip_id, {name: clip[name][keep] for name in inputs}, label)


class ClipDataset(Dataset):
    """One item per clip of a feature set; optionally every clip preloaded into memory."""

    def __init__(self, features: FeatureSet, classes: list[str], train: bool, inputs: tuple[str, ...],
                 preload: bool = False):
        unknown = [name for name in inputs if name not in STEP_INPUTS]
        if not inputs or unknown:
            raise ValueError(f"inputs must be some of {STEP_INPUTS}, got {inputs}")
        self.features = features
        self.inputs = inputs
        self.arrays = ("has_face", *inputs)
        self.clip_ids = list(features.clip_ids)
        index = {name: i for i, name in enumerate(classes)}
        self.labels = [UNLABELLED if features.labels[c] is None else index[features.labels[c]] for c in self.clip_ids]
        self.train = train
        self.cache = [self._read(i) for i in range(len(self.clip_ids))] if preload else None

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _read(self, i: int) -> ClipSteps:
        clip = self.features.read(self.clip_ids[i], self.arrays)
        return clip_steps(self.clip_ids[i], clip, self.labels[i], self.inputs)

    def __getitem__(self, i: int) -> ClipSteps:
        steps = self.cache[i] if self.cache is not None else self._read(i)
        if not self.train:
            return steps
        # A step of the first half: 2 * start < len(steps). torch's generator: seeded per DataLoader
        # worker, so runs repeat exactly.
        start = int(torch.randint(0, (len(steps) + 1) // 2, ()).item())
        return steps.from_step(start)


def collate(items: list[ClipSteps]) -> dict:
    """Left-aligned padding to the longest clip, one tensor per input the items have; `mask` is True on real steps."""
    lengths = torch.tensor([len(item) for item in items])
    steps = int(lengths.max())
    batch = {name: padded([item.inputs[name] for item in items], steps) for name in items[0].inputs}
    batch.update(
        mask=torch.arange(steps)[None, :] < lengths[:, None],
        label=torch.tensor([item.label for item in items]),
        clip_id=[item.clip_id for item in items],
    )
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
