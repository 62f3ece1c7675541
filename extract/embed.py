"""Stage 1's embedding step: sampled frames of many clips through the frozen networks in batches.

Frames arrive in windows (a run of consecutive sampled frames of one clip). Each window is
detected at once (its frames share a size); its face crops and context crops wait in a
queue that is embedded by the face and context CNNs in one call once it holds a batch, so
short clips share batches. A clip keeps only small per-frame results (detections and the
features of every detected face) until its last window is embedded; then its main face is
chosen over the whole clip and its arrays are assembled. Memory therefore grows with a
clip's features, never with its frames (unless face crops are stored: then with its crops).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from extract.context_cnn import ContextCNN, context_crops
from extract.face_cnn import FACE_FEATURE_DIM, FACE_MAP_SHAPE, FaceCNN
from extract.faces import choose_main_face, crop_every_face, detect_every_kth
from extract.retinaface import FaceDetections, RetinaFaceDetector


@dataclass
class Networks:
    detector: RetinaFaceDetector
    face_cnn: FaceCNN
    context_cnn: ContextCNN


@dataclass
class ClipInProgress:
    """One clip's results so far; `tag` is whatever the caller needs to recognise it later."""

    tag: object
    frame_area: float = 0.0
    timestamps: list[float] = field(default_factory=list)
    detections: list[FaceDetections] = field(default_factory=list)
    candidate_face: list[np.ndarray] = field(default_factory=list)
    candidate_map: list[np.ndarray] = field(default_factory=list)
    candidate_crops: list[np.ndarray] = field(default_factory=list)  # kept only when crops are stored
    context: list[np.ndarray] = field(default_factory=list)
    windows_waiting: int = 0
    all_windows_added: bool = False

    @property
    def ready(self) -> bool:
        return self.all_windows_added and self.windows_waiting == 0

    def assemble(self) -> dict[str, np.ndarray]:
        """The clip's per-frame arrays, with the main face chosen over the whole clip."""
        count = len(self.timestamps)
        choice = choose_main_face(self.detections, self.frame_area)
        first_candidate = np.cumsum([0] + [len(d.boxes) for d in self.detections])
        faces = np.concatenate(self.candidate_face + [np.zeros((0, FACE_FEATURE_DIM), np.float32)])
        maps = np.concatenate(self.candidate_map + [np.zeros((0, *FACE_MAP_SHAPE), np.float32)])
        out = {
            "timestamps": np.asarray(self.timestamps, np.float64),
            "has_face": np.array([c is not None for c in choice], bool),
            "box": np.full((count, 4), np.nan, np.float32),
            "score": np.zeros(count, np.float32),
            "landmarks": np.full((count, 5, 2), np.nan, np.float32),
            "face": np.zeros((count, FACE_FEATURE_DIM), np.float32),
            "face_map": np.zeros((count, *FACE_MAP_SHAPE), np.float32),
            "context": np.concatenate(self.context),
        }
        crops = np.concatenate(self.candidate_crops) if self.candidate_crops else None
        if crops is not None:
            out["face_crop"] = np.zeros((count, *crops.shape[1:]), np.uint8)
        for t, c in enumerate(choice):
            if c is None:
                continue
            found = self.detections[t]
            out["box"][t], out["score"][t], out["landmarks"][t] = found.boxes[c], found.scores[c], found.landmarks[c]
            out["face"][t] = faces[first_candidate[t] + c]
            out["face_map"][t] = maps[first_candidate[t] + c]
            if crops is not None:
                out["face_crop"][t] = crops[first_candidate[t] + c]
        return out


@dataclass
class _Window:
    clip: ClipInProgress
    face_crops: np.ndarray
    context_crops: torch.Tensor


class Embedder:
    """Queues windows of frames and embeds them in batches of about `batch_size` frames."""

    def __init__(self, networks: Networks, batch_size: int = 64, keep_crops: bool = False, detect_every: int = 1):
        self.networks = networks
        self.detect_every = detect_every
        self.batch_size = batch_size
        self.keep_crops = keep_crops
        self.queue: list[_Window] = []
        self.queued_frames = 0

    def add_window(self, clip: ClipInProgress, frames: np.ndarray, timestamps: list[float]) -> None:
        """Detect faces in (W,H,W,3) uint8 frames of `clip` now; queue their crops for the CNNs.

        Keyframes are counted from the clip's first frame, and tracking starts from the
        clip's last detected frame, so how a clip is cut into windows does not change what is detected or tracked.
        """
        pixels = torch.from_numpy(frames)
        previous = clip.detections[-1] if clip.detections else None
        detections = detect_every_kth(self.networks.detector, pixels, len(clip.timestamps), self.detect_every, previous)
        crops, _ = crop_every_face(pixels, detections)
        clip.frame_area = float(frames.shape[1] * frames.shape[2])
        clip.timestamps.extend(timestamps)
        clip.detections.extend(detections)
        clip.windows_waiting += 1
        if self.keep_crops:
            clip.candidate_crops.append(crops)
        self.queue.append(_Window(clip, crops, context_crops(pixels)))
        self.queued_frames += len(frames)
        if self.queued_frames >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        """Run the face and context CNNs over everything queued, in one call each."""
        if not self.queue:
            return
        faces = self.networks.face_cnn.embed(np.concatenate([w.face_crops for w in self.queue]))
        context = self.networks.context_cnn.embed(torch.cat([w.context_crops for w in self.queue]))
        face_splits = np.cumsum([len(w.face_crops) for w in self.queue])[:-1]
        context_splits = np.cumsum([len(w.context_crops) for w in self.queue])[:-1]
        per_window = zip(
            self.queue,
            np.split(faces.features.numpy(), face_splits),
            np.split(faces.maps.numpy(), face_splits),
            np.split(context.numpy(), context_splits),
        )
        for window, face, face_map, ctx in per_window:
            window.clip.candidate_face.append(face)
            window.clip.candidate_map.append(face_map)
            window.clip.context.append(ctx)
            window.clip.windows_waiting -= 1
        self.queue, self.queued_frames = [], 0


def finished(in_flight: deque[ClipInProgress]) -> Iterator[ClipInProgress]:
    """Pop the clips at the front of `in_flight` whose windows are all embedded, in order."""
    while in_flight and in_flight[0].ready:
        yield in_flight.popleft()
