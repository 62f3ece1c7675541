"""Stage 2's data: clips read from feature shards, as padded batches of aligned face and context steps.

Which frames are a clip's steps (one policy, `step_frames_mask`, and its batch form `batch_step_mask`):
- A model that sees (it reads the face, the context or the face maps) steps through the frames WITH a
  face, in time order, for every input: the paper pairs each detected face with its frame ("with each
  detected face, corresponding context stream contains the original frame"). A clip where no frame has
  a face still gets a prediction: its steps are all its frames, with face features of zero (the stored
  filler). Consequences: adding faceless frames to a clip that has faces changes nothing, and every
  clip of a split is scored.
- A model that only hears (`audio`) steps through every frame: the voice needs no face, and a speaker
  off screen or turned away is still heard (`has_audio` tells the frames without audio).
- A model that reads `has_face` picks its steps itself: the ensemble of members of both kinds reads
  every frame and gives each member its own steps.

Augmentation, as the paper: in training each clip starts at a random step among the first
half of its steps (so at least half of it remains); in evaluation it starts at the first.

Each model declares the per-frame inputs it reads (`model.inputs`, a subset of
`STEP_INPUTS`), and only those are read from the shards, with `has_face` to choose the steps:
Face-RNN never reads the context features, `c3d` reads only the face maps (128x4x4 per
frame, 8x the memory of the face features), the models that hear the voice (`audio`, with
`has_audio`, held only by sets extracted with audio). Within a model every input follows the
same steps: a seeing model hears a clip's voice on its frames with a face, as it sees its
context there.

Preloaded splits (train/packed.py) hold every clip's steps in one array per input; their
batches are gathered whole and equal, bit for bit, the batches `collate` makes of the same
clips read from the shards, except that each input keeps its stored dtype.

A split's features are opened here (`open_split`) and must be comparable with the features a
run learnt from (`check_comparable`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from features.reader import FeatureSet, open_features
from features.recipe import AUDIO_SETTINGS, attr_differences, with_setting_defaults
from features.schema import COMPARABILITY_KEYS, comparable, hears, shard_frame_arrays
from outputs import check_plain_name
from train.config import UNLABELLED, TrainError

if TYPE_CHECKING:
    from train.packed import PackedSteps

# The per-frame arrays (shard datasets) a model can take as steps, by name: `model(inputs, mask)`
# with `inputs` the arrays of `model.inputs`, listed in this order. The rest of a clip (boxes,
# landmarks, timestamps, scores) is never read in training, which saves a read per array and clip.
STEP_INPUTS = ("face", "context", "face_map", "audio", "has_audio", "has_face")
# What the pictures give: a model reading any of these steps through the frames with a face.
SEEN_INPUTS = ("face", "context", "face_map")


def open_split(root: Path, split: str) -> FeatureSet:
    """The features of `split` under the feature root `root`; TrainError when there are none."""
    folder = Path(root) / check_plain_name(split, "split")
    if not folder.is_dir():
        raise TrainError(f"no features for split '{split}' in {root}: run `python cli.py extract --split {split}` first")
    return open_features(folder)


def check_comparable(reference: dict, other: dict, what: str) -> None:
    """TrainError naming `what` when features of the attributes `other` cannot be mixed with `reference`'s."""
    differences = comparable(reference, other)
    if differences and hears(reference) != hears(other):
        raise TrainError(audio_mismatch(reference, other, what))
    if differences:
        raise TrainError(f"{what} were made with other settings ({'; '.join(differences)})")


def audio_mismatch(reference: dict, other: dict, what: str) -> str:
    """Why features of the attributes `other`, made without audio where `reference`'s were made with it (or the
    reverse), are refused, and what to do."""
    # Every audio setting differs then: audio_features alone says so, and it is the option to extract with.
    keys = tuple(key for key in COMPARABILITY_KEYS if key not in AUDIO_SETTINGS)
    shown = "; ".join(attr_differences(reference, other, keys))
    kind = with_setting_defaults(reference)["audio_features"]
    if not hears(reference):
        return (f"{what} were made with audio, unlike those they must match ({shown}): extract them with"
                f" --audio-features {kind}")
    return (f"{what} were made without audio, unlike those they must match ({shown}): extract them with"
            f" --audio-features {kind} or add it (features add-audio --audio-features {kind})")


def missing_inputs(attrs: dict, inputs: tuple[str, ...]) -> list[str]:
    """Those of `inputs` that features of these attributes do not hold: the voice, in sets made without audio."""
    held = shard_frame_arrays(attrs)
    return [name for name in inputs if name not in held]


def check_inputs_held(attrs: dict, inputs: tuple[str, ...], model: str, folder: Path) -> None:
    """TrainError when the features in `folder` lack an input that `model` reads."""
    missing = missing_inputs(attrs, inputs)
    if missing:
        raise TrainError(f"model {model} hears the voice ({', '.join(missing)}), but the features in {folder} were"
                         " made without audio: extract them with audio (extract --audio-features) or add it"
                         f" (python cli.py features add-audio {folder} --out NEW_FOLDER)")


def steps_every_frame(inputs: tuple[str, ...]) -> bool:
    """Whether a model of `inputs` steps through every frame: it only hears, or it reads has_face and picks its
    steps itself (the policy in this module's notes)."""
    return "has_face" in inputs or not any(name in SEEN_INPUTS for name in inputs)


def step_frames_mask(has_face: np.ndarray, inputs: tuple[str, ...]) -> np.ndarray:
    """Which of a clip's frames are its steps for a model of `inputs`: every frame for a model that steps through
    every frame; else its frames with a face, all of them when none has one."""
    if steps_every_frame(inputs) or not has_face.any():
        return np.ones(len(has_face), bool)
    return has_face


def batch_step_mask(has_face: torch.Tensor, mask: torch.Tensor, inputs: tuple[str, ...]) -> torch.Tensor:
    """`step_frames_mask` over a batch of every frame: which of each row's valid frames (`mask`) are its steps."""
    if steps_every_frame(inputs):
        return mask
    seen = has_face & mask
    return torch.where(seen.any(dim=1, keepdim=True), seen, mask)


@dataclass
class ClipSteps:
    clip_id: str
    inputs: dict[str, np.ndarray]  # name in STEP_INPUTS -> (T, ...) rows as stored (has_audio bool)
    label: int  # index into the classes, UNLABELLED for a clip without label

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def from_step(self, start: int) -> "ClipSteps":
        return ClipSteps(self.clip_id, {name: rows[start:] for name, rows in self.inputs.items()}, self.label)


def clip_steps(clip_id: str, clip: dict, label: int, inputs: tuple[str, ...]) -> ClipSteps:
    """A clip's steps of `inputs`, as every model input is built (training, evaluation, prediction)."""
    keep = step_frames_mask(clip["has_face"], inputs)
    return ClipSteps(clip_id, {name: clip[name][keep] for name in inputs}, label)


def random_start(length: int) -> int:
    """A training clip's first step, one of its first half: 2 * start < length.

    torch's generator: seeded per DataLoader worker, so runs repeat exactly; drawn one clip at
    a time in batch order, whichever way the batch is then put together.
    """
    return int(torch.randint(0, (length + 1) // 2, ()).item())


class ClipDataset(Dataset):
    """One item per clip of a feature set: its steps, read from the shards, or from `steps` when
    the split is preloaded, whole batches then being gathered at once (`__getitems__`)."""

    def __init__(self, features: FeatureSet, classes: list[str], train: bool, inputs: tuple[str, ...],
                 steps: PackedSteps | None = None, pin_memory: bool = False):
        unknown = [name for name in inputs if name not in STEP_INPUTS]
        if not inputs or unknown:
            raise ValueError(f"inputs must be some of {STEP_INPUTS}, got {inputs}")
        lacking = missing_inputs(features.attrs, inputs)
        if lacking:  # callers refuse such features first (check_inputs_held), naming them
            raise ValueError(f"these features do not hold {lacking}")
        if steps is not None and any(name not in steps.arrays for name in inputs):
            raise ValueError(f"the packed steps hold {tuple(steps.arrays)}, not all of {inputs}")
        self.features = features
        self.inputs = inputs
        self.arrays = tuple(dict.fromkeys(("has_face", *inputs)))
        self.clip_ids = list(features.clip_ids)
        index = {name: i for i, name in enumerate(classes)}
        labels = features.labels  # built anew at each access: once here, not once per clip
        self.labels = [UNLABELLED if labels[c] is None else index[labels[c]] for c in self.clip_ids]
        self.train = train
        self.steps = steps
        # Batches gathered straight into page-locked memory copy to a GPU without a staging copy.
        self.pin_memory = pin_memory
        self.buffers = BufferPool()

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _steps(self, i: int) -> ClipSteps:
        if self.steps is None:
            clip = self.features.read(self.clip_ids[i], self.arrays)
            return clip_steps(self.clip_ids[i], clip, self.labels[i], self.inputs)
        rows = slice(self.steps.offsets[i], self.steps.offsets[i + 1])
        return ClipSteps(self.clip_ids[i], {name: self.steps.arrays[name][rows] for name in self.inputs},
                         self.labels[i])

    def __getitem__(self, i: int) -> ClipSteps:
        steps = self._steps(i)
        return steps.from_step(random_start(len(steps))) if self.train else steps

    def __getitems__(self, indices: list[int]) -> list[ClipSteps] | dict:
        """A batch's clips for `collate`, or, preloaded, the batch itself (`gather`)."""
        if self.steps is None:
            return [self[i] for i in indices]
        lengths = self.steps.lengths[indices]
        starts = np.array([random_start(int(n)) for n in lengths] if self.train else np.zeros(len(indices)), np.int64)
        return self.gather(indices, starts)

    def gather(self, indices: list[int], starts: np.ndarray) -> dict:
        """The batch of clips `indices`, each from its step `starts`, as `collate` makes it, except
        that each input keeps its stored dtype (float16 context and maps stay float16 until the
        model's device): one contiguous copy per clip and input into reused memory."""
        first = self.steps.offsets[indices] + starts
        lengths = self.steps.lengths[indices] - starts
        valid = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
        inputs = {}
        for name in self.inputs:
            source = self.steps.arrays[name]
            shape = (*valid.shape, *source.shape[1:])
            if self.pin_memory:
                # torch keeps freed page-locked blocks for reuse once their copies to the GPU are done.
                out = torch.zeros(shape, dtype=TORCH_DTYPES[source.dtype], pin_memory=True)
                rows = out.numpy()
            else:
                rows = self.buffers.take(shape, source.dtype, valid)
                out = torch.from_numpy(rows)
            for row, (begin, length) in enumerate(zip(first, lengths)):
                rows[row, :length] = source[begin: begin + length]
            inputs[name] = out
        return batch_of(inputs, torch.from_numpy(lengths), [self.labels[i] for i in indices],
                        [self.clip_ids[i] for i in indices])


@dataclass(eq=False)  # compared by identity (a pool removes one of its buffers)
class HostBuffer:
    """Memory for batches of one kind of step: `array` (capacity, *step shape); `written` marks the
    rows that may hold a step of an earlier batch, every other row being zeros."""

    array: np.ndarray
    written: np.ndarray

    def is_free(self) -> bool:
        # Every array or tensor made from it keeps a reference: the attribute's and the call's own are left.
        return sys.getrefcount(self.array) == FREE_REFERENCES

    def rows(self, shape: tuple[int, ...], valid: np.ndarray) -> np.ndarray:
        """The first rows as a batch of `shape`, zeros wherever `valid` (clips, steps) is False."""
        count = valid.size
        stale = self.written[:count] & ~valid.ravel()
        self.array[:count][stale] = 0
        self.written[:count] = valid.ravel()
        return self.array[:count].reshape(shape)


class BufferPool:
    """Host memory for batches, used again once no batch refers to it.

    A fresh array as large as a batch of 25088-d context (tens of MB) comes from the system page
    by page, which costs several times the copy into it, and zeroing a batch's padding (often
    two thirds of it) as much again: a buffer of the pool keeps its size, and only the rows that
    held steps and are now padding are zeroed. A buffer is taken only when nothing else holds it:
    every tensor made from it, and every view of such a tensor, keeps a reference to it, so a
    batch kept by its consumer is never written over. (A consumer that writes into a batch's
    padding would find it in a later one; the models never read padding.)
    """

    MAX_BUFFERS = 4  # of each kind of step

    def __init__(self):
        self.buffers: dict[tuple, list[HostBuffer]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype, valid: np.ndarray) -> np.ndarray:
        """An array of `shape` (clips, steps, ...) with zeros wherever `valid` (clips, steps) is False."""
        kind = (np.dtype(dtype), shape[2:])
        buffers = self.buffers.setdefault(kind, [])
        count = valid.size
        free = [buffer for buffer in buffers if buffer.is_free()]
        fitting = [buffer for buffer in free if len(buffer.array) >= count]
        if fitting:
            return fitting[0].rows(shape, valid)
        if free:
            buffers.remove(free[0])  # too small for this batch: replaced by one that fits
        elif len(buffers) >= self.MAX_BUFFERS:
            return np.zeros(shape, dtype)  # the consumer holds every buffer: memory of its own, not kept
        # As large as the largest batch yet, so that batches of varying lengths settle on a few buffers.
        capacity = max([count, *(len(buffer.array) for buffer in buffers)])
        buffers.append(HostBuffer(np.zeros((capacity, *shape[2:]), dtype), np.zeros(capacity, bool)))
        return buffers[-1].rows(shape, valid)


FREE_REFERENCES = 2
TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16, np.dtype(bool): torch.bool}


def batch_of(inputs: dict[str, torch.Tensor], lengths: torch.Tensor, labels: list[int], clip_ids: list[str]) -> dict:
    """A batch: the padded inputs by name, `mask` True on each row's real steps, labels and clip ids."""
    steps = next(iter(inputs.values())).shape[1]
    return dict(inputs, mask=torch.arange(steps)[None, :] < lengths[:, None], label=torch.tensor(labels),
                clip_id=clip_ids)


def collate(items: list[ClipSteps] | dict) -> dict:
    """Left-aligned padding to the longest clip, one float32 tensor per input the items have, bool for
    flags (has_audio, has_face); a batch already gathered from packed steps passes through."""
    if isinstance(items, dict):
        return items
    lengths = torch.tensor([len(item) for item in items])
    steps = int(lengths.max())
    inputs = {name: padded([item.inputs[name] for item in items], steps) for name in items[0].inputs}
    return batch_of(inputs, lengths, [item.label for item in items], [item.clip_id for item in items])


def padded(arrays: list[np.ndarray], steps: int) -> torch.Tensor:
    """(clips, steps, ...): each clip's rows first, zeros (False) after; float32, or bool for bool rows.

    Assigning float16 rows into the float32 array converts them in the copy itself; a
    separate astype would be one more pass over the batch's largest array.
    """
    dtype = bool if arrays[0].dtype == bool else np.float32
    out = np.zeros((len(arrays), steps, *arrays[0].shape[1:]), dtype)
    for row, array in enumerate(arrays):
        out[row, : len(array)] = array
    return torch.from_numpy(out)


def model_inputs(model: nn.Module, batch: dict, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """What `model(inputs, mask)` takes from a collated batch, on `device`: the arrays it declares, and the mask.

    Inputs keep their dtype on the way (float16 context is half the bytes to copy); each model
    computes in its weights' dtype from there. From page-locked memory the copies run
    asynchronously.
    """
    return ({name: batch[name].to(device, non_blocking=True) for name in model.inputs},
            batch["mask"].to(device, non_blocking=True))


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
