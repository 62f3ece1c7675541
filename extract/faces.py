"""Stage 1's face step: detect faces in a clip's sampled frames, follow its main face, crop it.

Faces are detected on every sampled frame (the paper's protocol), or with --detect-every K
on every K-th one, each face being re-detected near its last box on the frames between.

The main face is chosen for the whole clip at once, not frame by frame: a Viterbi pass over
each frame's detections maximises detection confidence and face size while penalising jumps
between boxes that do not overlap, so a passer-by who is briefly larger or surer than the
speaker does not steal single frames. Frames without a main face (no detection above the
threshold, or only faces judged to be someone else) are kept and marked so; nothing is
filled in for them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from extract.retinaface import FaceDetections, RetinaFaceDetector

FACE_CROP_SIZE = 128
# The crop is a square around the box centre, this much larger than the box's longer side,
# so that the whole face (chin, forehead) is in it as in the face CNN's training images.
FACE_CROP_SCALE = 1.2
# Frames are detected on a copy whose longer side is at most this (boxes are mapped back):
# RetinaFace's anchors start at 16 px, and faces in clips are far larger than that.
DETECT_MAX_SIDE = 640
# Cost, in log-confidence units, of moving from one face to another that is far from it.
SWITCH_PENALTY = 4.0
SIZE_WEIGHT = 0.5
# A face must gain more than this to be the main face: a confident face covering 0.1% of
# the frame scores about -3.5, a 0.5-confidence one about -4.1.
NO_FACE_GAIN = -6.0
# Tracking between keyframes (--detect-every K > 1): a face is looked for again in a square
# this many times its last box, which still holds it whole after it moved three quarters of
# its size between samples; the square is resized to this side (the face about 77 px, well
# inside RetinaFace's anchors), 16% of a 640x360 frame's pixels. Measured against detecting
# every frame in benchmarks/README.md: a smaller square loses fast faces, and scaling the
# face further from its size on keyframes shifts its box.
TRACK_REGION_SCALE = 2.5
TRACK_REGION_SIZE = 192
# roi_align's adaptive sampling takes side/size points per output pixel and axis, so a square a
# hundred times the frame (which a detector could return on an odd video) ran out of memory, and
# larger ones hung or crashed the process. Sampling is capped at what a square this many times
# the frame's longer side takes; no square of a real face comes near it.
MAX_SQUARE_PER_FRAME_SIDE = 4


def detect_downscaled(detector: RetinaFaceDetector, frames: torch.Tensor) -> list[FaceDetections]:
    """Detect on frames (N,H,W,3) uint8, downscaled when large, with results in full-size pixels.

    A side is never scaled below one pixel (a 2x10000 frame is detected at 1x640). Frames are
    scaled one at a time: in float, a window of 8K frames would take four times its bytes.
    """
    height, width = frames.shape[1:3]
    scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
    if scale == 1.0:
        return detector.detect(frames)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = torch.cat([_resized(frame, size) for frame in frames.split(1)])
    sy, sx = height / size[0], width / size[1]
    results = detector.detect(small)
    for r in results:
        r.boxes *= np.array([sx, sy, sx, sy], dtype=np.float32)
        r.landmarks *= np.array([sx, sy], dtype=np.float32)
    return results


def _resized(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,H,W,3) uint8 frames scaled to `size` (height, width), antialiased."""
    small = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", antialias=True)
    return small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def detect_every_kth(
    detector: RetinaFaceDetector, frames: torch.Tensor, first_index: int, every: int, previous: FaceDetections | None
) -> list[FaceDetections]:
    """Detections in a window of a clip's consecutive frames (N,H,W,3): full detection on keyframes
    (clip frame index `first_index + i` a multiple of `every`), tracking on the frames between.

    Tracking looks for each face of the previous frame (`previous` for the window's first
    frame) again near where it was (`detect_near`), so a frame between keyframes finds only
    faces it can follow: a face that appears is found at the next keyframe, one that is lost
    (left the frame, turned away, moved further than the region allows) stays lost until then.
    With `every` 1 every frame is a keyframe: the paper's protocol.
    """
    keys = [i for i in range(len(frames)) if (first_index + i) % every == 0]
    found = dict(zip(keys, detect_downscaled(detector, frames[keys]))) if keys else {}
    detections = []
    for i in range(len(frames)):
        previous = found[i] if i in found else detect_near(detector, frames[i : i + 1], previous)
        detections.append(previous)
    return detections


def detect_near(detector: RetinaFaceDetector, frame: torch.Tensor, previous: FaceDetections | None) -> FaceDetections:
    """Faces of `previous` found again in one frame (1,H,W,3), each within a region around its box.

    Each region is a square TRACK_REGION_SCALE times the box, resized to TRACK_REGION_SIZE,
    and all of a frame's regions are detected in one call: a fraction of the frame's pixels,
    yet real boxes, scores and landmarks, so the main-face choice works as on keyframes. Per
    region the detection nearest its centre is the face followed (another face partly in the
    region is not); two regions that found the same face are merged by the detector's NMS.
    """
    if previous is None or len(previous.boxes) == 0:
        return _no_faces()
    regions = squares_around(previous.boxes, TRACK_REGION_SCALE)
    crops = torch.from_numpy(cut_squares(frame, regions, np.zeros(len(regions), int), TRACK_REGION_SIZE))
    followed = [
        _in_frame(_nearest_centre(found), region)
        for found, region in zip(detector.detect(crops), regions)
        if len(found.boxes)
    ]
    if not followed:
        return _no_faces()
    boxes = np.concatenate([f.boxes for f in followed])
    scores = np.concatenate([f.scores for f in followed])
    landmarks = np.concatenate([f.landmarks for f in followed])
    kept = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), detector.nms_threshold).numpy()
    return FaceDetections(boxes[kept], scores[kept], landmarks[kept])


def _no_faces() -> FaceDetections:
    return FaceDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))


def _nearest_centre(found: FaceDetections) -> FaceDetections:
    """The one detection of a region nearest the region's centre."""
    centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
    i = int(np.linalg.norm(centres - TRACK_REGION_SIZE / 2, axis=1).argmin())
    return FaceDetections(found.boxes[i : i + 1], found.scores[i : i + 1], found.landmarks[i : i + 1])


def _in_frame(found: FaceDetections, region: np.ndarray) -> FaceDetections:
    """Detections in a region's crop mapped to frame pixels (a crop pixel spans `scale` frame pixels)."""
    scale = np.float32((region[2] - region[0]) / TRACK_REGION_SIZE)
    origin = region[:2].astype(np.float32)
    return FaceDetections(found.boxes * scale + np.tile(origin, 2), found.scores, found.landmarks * scale + origin)


def _box_area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _gain(detections: FaceDetections, frame_area: float) -> np.ndarray:
    """How much each detection looks like the main face: confident and large."""
    area = np.clip(_box_area(detections.boxes), 1.0, None) / frame_area
    return np.log(np.clip(detections.scores, 1e-6, None)) + SIZE_WEIGHT * np.log(area)


def _centres_and_sides(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).max(axis=1)


def _transition(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """(K_prev + 1, K_cur + 1) costs; the last row and column are the "no main face" state.

    A face that moved by d between samples pays SWITCH_PENALTY * min(1, d / (2 * side)): at
    5 fps a head moves a fraction of its size, another person is usually further away.
    """
    cost = np.full((len(previous) + 1, len(current) + 1), -SWITCH_PENALTY / 2)
    cost[-1, -1] = 0.0
    if len(previous) and len(current):
        (c0, s0), (c1, s1) = _centres_and_sides(previous), _centres_and_sides(current)
        distance = np.linalg.norm(c0[:, None] - c1[None], axis=-1)
        cost[:-1, :-1] = -SWITCH_PENALTY * np.minimum(1.0, distance / (s0[:, None] + s1[None]))
    return cost


def choose_main_face(detections: list[FaceDetections], frame_area: float) -> list[int | None]:
    """Per frame, the index of the main face's detection, or None.

    A Viterbi pass over the clip: each frame's states are its detections plus "no main
    face" (gain NO_FACE_GAIN); moving between boxes costs up to SWITCH_PENALTY (see
    `_transition`), losing or regaining the face costs half of it. So a frame where the
    detector missed the speaker and found only a small background face gets no face rather
    than the wrong person.
    """
    if not detections:
        return []
    gains = [np.append(_gain(d, frame_area), NO_FACE_GAIN) for d in detections]
    best, back = gains[0], []
    for previous, current, gain in zip(detections, detections[1:], gains[1:]):
        moves = best[:, None] + _transition(previous.boxes, current.boxes)
        back.append(moves.argmax(axis=0))
        best = moves.max(axis=0) + gain
    state = int(best.argmax())
    path = [state]
    for pointers in reversed(back):
        state = int(pointers[state])
        path.append(state)
    return [s if s < len(d.boxes) else None for s, d in zip(reversed(path), detections)]


def squares_around(boxes: np.ndarray, scale: float) -> np.ndarray:
    """(N, 4) squares centred on boxes, `scale` times their longer side."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(axis=1, keepdims=True) * scale / 2
    return np.concatenate([centre - half, centre + half], axis=1)


def cut_squares(frames: torch.Tensor, squares: np.ndarray, owners: np.ndarray, size: int) -> np.ndarray:
    """(N,size,size,3) uint8 images of squares in frames[owners]; outside the frame is black.

    roi_align samples several points per output pixel when shrinking, which antialiases. Each
    square is cut from just the pixels around it, converted to float: a face is a small part
    of a frame, and converting whole frames cost more than detecting the faces in them.
    """
    if len(squares) == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    crops = torch.cat([_cut_square(frames[owner], square, size) for square, owner in zip(squares, owners)])
    return crops.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _cut_square(frame: torch.Tensor, square: np.ndarray, size: int) -> torch.Tensor:
    """(1,3,size,size) float: one square of a frame (H,W,3) uint8, by roi_align on the pixels it reads.

    The bilinear samples lie inside the square and read one pixel on each side; two pixels of
    margin keep them off the region's edges, where roi_align would clamp, unless those edges
    are the frame's, where it clamps (or goes black) as on the whole frame.
    """
    height, width = frame.shape[:2]
    x0, x1 = (min(max(value, 0), width) for value in (math.floor(square[0]) - 2, math.ceil(square[2]) + 2))
    y0, y1 = (min(max(value, 0), height) for value in (math.floor(square[1]) - 2, math.ceil(square[3]) + 2))
    if x1 <= x0 or y1 <= y0:
        return torch.zeros((1, 3, size, size), device=frame.device)  # wholly outside the frame: black
    region = frame[y0:y1, x0:x1].permute(2, 0, 1)[None].float()
    roi = torch.tensor([[0.0, square[0] - x0, square[1] - y0, square[2] - x0, square[3] - y0]], device=frame.device)
    return torchvision.ops.roi_align(region, roi, output_size=size, sampling_ratio=_samples_per_bin(square, frame, size),
                                     aligned=True)


def _samples_per_bin(square: np.ndarray, frame: torch.Tensor, size: int) -> int:
    """roi_align's sampling_ratio: adaptive (-1), capped at what a square MAX_SQUARE_PER_FRAME_SIDE
    times the frame's longer side would take."""
    cap = math.ceil(MAX_SQUARE_PER_FRAME_SIDE * max(frame.shape[:2]) / size)
    return -1 if (square[2] - square[0]) / size <= cap else cap


def crop_squares(frames: torch.Tensor, boxes: np.ndarray, owners: np.ndarray, size: int = FACE_CROP_SIZE) -> np.ndarray:
    """Face crops (N,size,size,3) uint8: squares FACE_CROP_SCALE times the boxes in frames[owners]."""
    return cut_squares(frames, squares_around(boxes, FACE_CROP_SCALE), owners, size)


def crop_every_face(frames: torch.Tensor, detections: list[FaceDetections]) -> tuple[np.ndarray, np.ndarray]:
    """Crops of all detections in frames (N,H,W,3), and the frame index each crop came from.

    Every candidate is cropped (not only the main face) because the main face is chosen over
    the whole clip, after its frames are gone: the candidates' features are kept instead.
    """
    owners = np.concatenate([np.full(len(d.boxes), i) for i, d in enumerate(detections)] + [np.zeros(0, int)])
    boxes = np.concatenate([d.boxes for d in detections] + [np.zeros((0, 4), np.float32)])
    return crop_squares(frames, boxes, owners), owners
