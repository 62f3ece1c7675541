"""The face step: main-face choice over a clip, crops, and detection on large frames."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision.ops import box_area, box_iou

from extract.context_cnn import CONTEXT_SIZE, context_crops
from extract.face_cnn import EXPRESSION_CLASSES
from extract.faces import (
    FACE_CROP_SIZE, choose_main_face, crop_every_face, crop_squares, cut_squares, detect_downscaled, detect_every_kth,
)
from extract.retinaface import FaceDetections
from tests.media import ASTRONAUT_FACE_BOX, face_box, heads_on_scene, photo, read_clip, write_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector(networks):
    return networks.detector


def faces(*boxes_and_scores) -> FaceDetections:
    boxes = np.array([b for b, _ in boxes_and_scores], np.float32).reshape(-1, 4)
    scores = np.array([s for _, s in boxes_and_scores], np.float32)
    return FaceDetections(boxes, scores, np.zeros((len(scores), 5, 2), np.float32))


SPEAKER = ((100, 100, 200, 200), 0.99)
FRAME_AREA = 640.0 * 360.0


def test_a_briefly_larger_and_surer_passer_by_does_not_steal_a_frame():
    passer_by = ((300, 50, 460, 210), 0.999)
    clip = [faces(SPEAKER), faces(SPEAKER), faces(passer_by, SPEAKER), faces(SPEAKER), faces(SPEAKER)]
    assert choose_main_face(clip, FRAME_AREA) == [0, 0, 1, 0, 0]


def test_a_small_background_face_is_not_taken_when_the_speaker_is_missed():
    background = ((500, 20, 506, 26), 0.55)
    clip = [faces(SPEAKER), faces(SPEAKER), faces(background), faces(SPEAKER)]
    assert choose_main_face(clip, FRAME_AREA) == [0, 0, None, 0]


def test_the_choice_follows_a_new_speaker_who_stays():
    other = ((400, 100, 520, 220), 0.98)
    clip = [faces(SPEAKER)] * 2 + [faces(other)] * 6
    assert choose_main_face(clip, FRAME_AREA) == [0, 0] + [0] * 6  # the only face in each frame
    clip = [faces(SPEAKER, other)] * 2 + [faces(other)] * 6
    assert choose_main_face(clip, FRAME_AREA) == [1, 1] + [0] * 6  # "other" throughout: no switch at all


def test_frames_without_detections():
    assert choose_main_face([], FRAME_AREA) == []
    assert choose_main_face([faces(), faces()], FRAME_AREA) == [None, None]
    assert choose_main_face([faces(), faces(SPEAKER), faces()], FRAME_AREA) == [None, 0, None]


def test_crops_are_square_scaled_and_black_outside_the_frame():
    frame = torch.full((1, 100, 100, 3), 200, dtype=torch.uint8)
    inside = crop_squares(frame, np.array([[30, 30, 70, 70]], np.float32), np.zeros(1, int))
    assert inside.shape == (1, FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and inside.dtype == np.uint8
    assert np.all(inside == 200)
    corner = crop_squares(frame, np.array([[-20, -20, 20, 20]], np.float32), np.zeros(1, int))[0]
    assert corner[5, 5].max() == 0 and corner[-5, -5].min() == 200


def test_squares_far_larger_than_the_frame_are_cut_in_bounded_time():
    """A box a hundred or a million times the frame took hours, or crashed the process, in
    roi_align's adaptive sampling: run in a child so that a crash fails this test only."""
    probe = (
        "import numpy as np, torch\n"
        "from extract.faces import crop_squares\n"
        "frame = torch.full((1, 360, 640, 3), 200, dtype=torch.uint8)\n"
        "boxes = np.array([[-3e4, -3e4, 3e4, 3e4], [-1e6, -1e6, 1e6, 1e6], [300, 170, 340, 210]], np.float32)\n"
        "crops = crop_squares(frame, boxes, np.zeros(3, int))\n"
        "print(crops[0, 0, 0].max(), crops[0, 64, 64].min(), crops[1].max(), crops[2].min())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    corner, centre, huge, face = map(int, done.stdout.split())
    assert corner == 0 and centre > 0, "the frame is a dot in the middle of a black square"
    assert huge == 0 and face == 200


def test_detection_on_a_downscaled_copy_maps_boxes_back(detector):
    small = photo("astronaut")
    big = torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(2, 0, 1)[None].float(), size=(1280, 1280), mode="bilinear"
    ).round().to(torch.uint8).permute(0, 2, 3, 1)
    found = detect_downscaled(detector, big)[0]
    expected = np.array(ASTRONAUT_FACE_BOX, np.float32) * 2.5
    assert found.scores[0] > 0.9
    assert np.abs(found.boxes[0] - expected).max() < 0.15 * (expected[2] - expected[0])
    assert np.all((found.landmarks[0] > expected[:2]) & (found.landmarks[0] < expected[2:]))


# A clip of two scenes (480x270), each frame listed as (scene, heads): the heads are real face
# photos (face, left, top, side), the main person's first. The main person, Eileen Collins,
# is the largest face in every frame but two. Before the cut a passer-by, the cameraman,
# crosses the bottom of the frame, closer to the camera (larger than her) in frame 2. At the
# cut she jumps to the other side, and Grace Hopper appears where she was, smaller; then the
# two swap sides, Grace Hopper passing above her, closer to the camera (larger) in frame 10.
MAIN_FACE_FRAME = (270, 480)
MAIN_FACE_CUT = 6
MAIN_FACE_CLIP = [
    ("coffee", [("eileen_collins", 30 + 3 * i, 20, 128),
                ("cameraman", 261, 115, 150) if i == 2 else ("cameraman", 390 - 64 * i, 182, 84)])
    for i in range(MAIN_FACE_CUT)
] + [
    ("rocket", [("eileen_collins", 338 - 32 * k, 140, 128),
                ("grace_hopper", 200, 0, 136) if k == 4 else ("grace_hopper", 72 + 32 * k, 48, 64)])
    for k in range(10)
]


def test_the_main_face_is_followed_through_a_passer_by_a_cut_and_a_swap(detector, networks, tmp_path):
    """The documented rule (extract/faces.py): over the whole clip, confidence and size, with up
    to SWITCH_PENALTY paid for each jump between faces that are not near each other.

    Frame by frame, what it must not do: take the passer-by when he is the larger face (frame 2)
    or Grace Hopper when she is (frame 10), as a choice made frame by frame would; stay where the
    main face was before the cut, where Grace Hopper now is, as a nearest-box tracker would. The
    main person's jump at the cut pays SWITCH_PENALTY once; being larger for the rest of the clip
    repays it. (A more confident passer-by is the synthetic test above.)
    """
    frames = [heads_on_scene(scene, MAIN_FACE_FRAME, heads) for scene, heads in MAIN_FACE_CLIP]
    decoded = torch.from_numpy(np.stack(read_clip(write_clip(tmp_path / "two-people.mp4", frames))))
    found = detect_downscaled(detector, decoded)
    planted = [[face_box(*where) for _, *where in heads] for _, heads in MAIN_FACE_CLIP]
    ious = [box_iou(torch.from_numpy(d.boxes), torch.from_numpy(np.stack(p))).numpy() for d, p in zip(found, planted)]
    # Both people are found in every frame, so there is a choice to make.
    assert [iou.shape[0] for iou in ious] == [2] * len(frames)
    assert all((iou.max(axis=0) > 0.5).all() for iou in ious)
    main, other = (torch.from_numpy(np.stack([d.boxes[iou[:, who].argmax()] for d, iou in zip(found, ious)]))
                   for who in (0, 1))
    assert torch.nonzero(box_area(other) > box_area(main)).flatten().tolist() == [2, MAIN_FACE_CUT + 4]

    chosen = choose_main_face(found, float(decoded.shape[1] * decoded.shape[2]))
    assert None not in chosen
    boxes = np.stack([d.boxes[c] for d, c in zip(found, chosen)])
    per_frame = box_iou(torch.from_numpy(boxes), torch.from_numpy(np.stack([p[0] for p in planted]))).diagonal()
    assert (per_frame > 0.5).all(), per_frame
    assert all(d.scores[c] > 0.9 for d, c in zip(found, chosen))
    crops = crop_squares(decoded, boxes, np.arange(len(boxes)))
    assert crops.shape == (len(frames), FACE_CROP_SIZE, FACE_CROP_SIZE, 3)
    expressions = networks.face_cnn.expressions(crops)
    assert {EXPRESSION_CLASSES[int(i)] for i in expressions.argmax(dim=1)} == {"happy"}


def test_every_candidate_is_cropped_with_its_frame_index():
    frames = torch.zeros((3, 100, 100, 3), dtype=torch.uint8)
    frames[1] = 50
    frames[2] = 100
    found = [faces(SPEAKER), faces(), faces(SPEAKER, ((0, 0, 10, 10), 0.9))]
    crops, owners = crop_every_face(frames, found)
    assert owners.tolist() == [0, 2, 2]
    assert crops.shape == (3, FACE_CROP_SIZE, FACE_CROP_SIZE, 3)
    assert crops[2].max() == 100 and crops[0].max() == 0
    empty_crops, empty_owners = crop_every_face(frames, [faces(), faces(), faces()])
    assert empty_crops.shape == (0, FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and len(empty_owners) == 0


def test_squares_cut_from_their_surroundings_equal_squares_cut_from_whole_frames():
    """Inside, across the edge of and wholly outside the frame, on random pixels."""
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 90, 160, 3), dtype=np.uint8))
    squares = np.array([[10.3, 5.7, 60.2, 55.6], [-20.5, -10.2, 30.1, 40.7], [120.4, 50.2, 190.9, 120.7],
                        [200.0, 100.0, 260.0, 160.0]], np.float32)
    owners = np.array([0, 1, 2, 0])
    rois = torch.cat([torch.from_numpy(owners).float()[:, None], torch.from_numpy(squares)], dim=1)
    whole = torchvision.ops.roi_align(frames.permute(0, 3, 1, 2).float(), rois, 32, sampling_ratio=-1, aligned=True)
    expected = whole.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(cut_squares(frames, squares, owners, 32), expected)


@pytest.mark.parametrize("height, width", [(1, 10000), (10000, 1), (2, 10000), (10000, 2), (8, 8), (1, 1)])
def test_frames_of_extreme_shapes_are_detected_tracked_and_cropped(detector, height, width):
    """No face in them is a fine answer; a box from an earlier frame is followed and cropped (black outside)."""
    frames = torch.full((4, height, width, 3), 128, dtype=torch.uint8)
    assert [len(found.boxes) for found in detect_downscaled(detector, frames)] == [0, 0, 0, 0]
    previous = faces(((0, 0, 50, 60), 0.9), ((-5, -5, 3, 3), 0.8))
    tracked = detect_every_kth(detector, frames, 1, 3, previous)  # clip frames 1-4: 3 detected, the others tracked
    assert [len(found.boxes) for found in tracked] == [0, 0, 0, 0]
    crops, owners = crop_every_face(frames, [previous] * 4)
    assert crops.shape == (8, FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and owners.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert context_crops(frames).shape == (4, CONTEXT_SIZE, CONTEXT_SIZE, 3)
