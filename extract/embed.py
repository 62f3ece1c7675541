"""Stage 1's embedding step: sampled frames of many clips through the frozen networks in batches.

Frames arrive in windows (a run of consecutive sampled frames of one clip). Each window is
detected at once (its frames share a size); its face crops and context crops wait in a
queue that is embedded by the face and context CNNs in one call once it holds a batch, so
short clips share batches. A clip keeps only small per-frame results (detections and the
features of every detected face) until its last window is embedded; then its main face is
chosen over the whole clip and its arrays are assembled. Memory therefore grows with a
clip's features, never with its frames (unless face crops are stored: then with its crops).

An error in one clip's detection or crops, or in a CNN call its windows are part of, fails that
clip only (`ClipInProgress.failed`); the other clips of a batch keep their features.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from extract.context_cnn import ContextCNN, context_crops
from extract.face_cnn import FACE_FEATURE_DIM, FACE_MAP_SHAPE, FaceCNN
from extract.faces import choose_main_face, crop_every_face, detect_every_kth
from extract.retinaface import FaceDetections, RetinaFaceDetector
from extract.audio import Heard
from extract.video import VideoInfo
from manifests.manifest import ClipEntry

logger = logging.getLogger(__name__)


@dataclass
class Networks:
    detector: RetinaFaceDetector
    face_cnn: FaceCNN
    context_cnn: ContextCNN


@dataclass
class StageError:
    """Why a clip failed: the stage of its extraction (features.failures.STAGES) and the exception."""

    stage: str
    exception: Exception


@dataclass
class ClipInProgress:
    """One clip's results so far."""

    entry: ClipEntry
    info: VideoInfo | None = None  # its video's, once its decoding has ended well
    heard: Heard | None = None  # its voice, then, when the recipe hears
    frame_area: float = 0.0
    timestamps: list[float] = field(default_factory=list)
    detections: list[FaceDetections] = field(default_factory=list)
    candidate_face: list[np.ndarray] = field(default_factory=list)
    candidate_map: list[np.ndarray] = field(default_factory=list)
    candidate_crops: list[np.ndarray] = field(default_factory=list)  # kept only when crops are stored
    context: list[np.ndarray] = field(default_factory=list)
    windows_waiting: int = 0
    all_windows_added: bool = False
    failed: StageError | None = None

    @property
    def ready(self) -> bool:
        return self.all_windows_added and (self.failed is not None or self.windows_waiting == 0)

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
        An error there fails the clip at stage "detect"; the windows of a failed clip are ignored.
        """
        if clip.failed is not None:
            return
        pixels = torch.from_numpy(frames)
        previous = clip.detections[-1] if clip.detections else None
        try:
            detections = detect_every_kth(self.networks.detector, pixels, len(clip.timestamps), self.detect_every,
                                          previous)
            crops, _ = crop_every_face(pixels, detections)
            window = _Window(clip, crops, context_crops(pixels))
        except Exception as exc:  # this clip's frames or detections: only this clip fails
            self.fail(clip, "detect", exc)
            return
        clip.frame_area = float(frames.shape[1] * frames.shape[2])
        clip.timestamps.extend(timestamps)
        clip.detections.extend(detections)
        clip.windows_waiting += 1
        if self.keep_crops:
            clip.candidate_crops.append(crops)
        self.queue.append(window)
        self.queued_frames += len(frames)
        if self.queued_frames >= self.batch_size:
            self.flush()

    def fail(self, clip: ClipInProgress, stage: str, exception: Exception) -> None:
        """Mark `clip` failed (its first failure is kept) and drop its queued windows: it is finished."""
        clip.failed = clip.failed or StageError(stage, exception)
        dropped = [w for w in self.queue if w.clip is clip]
        self.queue = [w for w in self.queue if w.clip is not clip]
        self.queued_frames -= sum(len(w.context_crops) for w in dropped)

    def flush(self) -> None:
        """Run the face and context CNNs over everything queued, in one call each.

        If that call raises, the windows are run one by one: only the clips whose own windows
        still raise fail (stage "embed"). The others keep their features, which CPU kernels may
        round differently in a call of another size (last float bits).
        """
        if not self.queue:
            return
        try:
            embedded = self._embedded(self.queue)
        except Exception:
            logger.info("a CNN call over %d windows failed; running them one by one", len(self.queue), exc_info=True)
            embedded = [self._embedded_alone(window) for window in self.queue]
        for window, result in zip(self.queue, embedded):
            window.clip.windows_waiting -= 1
            if isinstance(result, Exception):
                window.clip.failed = window.clip.failed or StageError("embed", result)
                continue
            face, face_map, ctx = result
            window.clip.candidate_face.append(face)
            window.clip.candidate_map.append(face_map)
            window.clip.context.append(ctx)
        self.queue, self.queued_frames = [], 0

    def _embedded(self, windows: list[_Window]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Face features, face maps and context features of each window, from one call of each CNN."""
        faces = self.networks.face_cnn.embed(np.concatenate([w.face_crops for w in windows]))
        context = self.networks.context_cnn.embed(torch.cat([w.context_crops for w in windows]))
        face_splits = np.cumsum([len(w.face_crops) for w in windows])[:-1]
        context_splits = np.cumsum([len(w.context_crops) for w in windows])[:-1]
        return list(zip(
            np.split(faces.features.numpy(), face_splits),
            np.split(faces.maps.numpy(), face_splits),
            np.split(context.numpy(), context_splits),
        ))

    def _embedded_alone(self, window: _Window) -> tuple[np.ndarray, np.ndarray, np.ndarray] | Exception:
        try:
            return self._embedded([window])[0]
        except Exception as exc:  # this window's own error: its clip fails
            return exc


def finished(in_flight: deque[ClipInProgress]) -> Iterator[ClipInProgress]:
    """Pop the clips at the front of `in_flight` whose windows are all embedded, in order."""
    while in_flight and in_flight[0].ready:
        yield in_flight.popleft()
