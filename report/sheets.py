"""Contact sheets: for each chosen clip, K frames across it with the stored main-face box drawn, the
face crop beside each, a strip marking the frames with and without a face, and for a set that hears
a strip of its stored audio above it on the same time axis (report/audio.py). The K frames are
spread evenly, but for the first frame without a face and both sides of the main face's first
jump, which take the place of the nearest spread ones.

Frames are decoded again from the clip's source video, sampled as `extract` sampled them (the
same decoder at the set's fps), and matched to the stored timestamps; the stored box is drawn
as it is. A video that cannot be reached or no longer holds those frames is said so in the
clip's notes; the crops then come from the set when it stores them, and the strip is always
drawn. Everything a shard says is data: the source path is only read, and only when it is an
absolute path to a regular file below the folder the user named with --videos.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from extract.faces import FACE_CROP_SIZE, crop_squares
from extract.video import VideoError, sample_frames
from features.reader import FeatureSet
from features.recipe import with_setting_defaults
from features.schema import AUDIO_ARRAY_NAMES, hears
from values import shown
from report.audio import Voice, voice_colours
from report.choice import Chosen
from report.facts import jump_frames

# Frames are shown as tall as the crop beside them, which is shown at its own size.
FRAME_HEIGHT = FACE_CROP_SIZE
MAX_FRAME_WIDTH = 2 * FRAME_HEIGHT  # wider frames are shown smaller
# A decoded frame is the stored one when their times agree to this (seconds): the decoder is the
# extractor's, so they are equal unless the video changed.
SAME_TIME = 1e-3
TIMELINE_WIDTH, TIMELINE_HEIGHT, MARK_HEIGHT = 800, 14, 5
AUDIO_HEIGHT = 64  # pixels of the audio strip, whatever its number of values (64 log-mel bands, 25 descriptors)
FACE_COLOUR, NO_FACE_COLOUR, MARK_COLOUR = (46, 160, 67), (214, 39, 40), (0, 0, 0)
BOX_COLOUR, BOX_WIDTH = (0, 255, 0), 2
STORED_ARRAYS = ("timestamps", "has_face", "box", "score")


@dataclass
class Cell:
    """One shown frame of a clip."""

    position: int  # among the clip's sampled frames
    time: float
    has_face: bool
    score: float
    frame: np.ndarray | None = None  # RGB, the stored box drawn; None when the video could not give it
    crop: np.ndarray | None = None  # the main face's crop, FACE_CROP_SIZE square RGB


@dataclass
class ClipSheet:
    chosen: Chosen
    cells: list[Cell]
    timeline: np.ndarray  # RGB strip: the clip's frames with (green) and without (red) a face, shown ones marked
    notes: list[str] = field(default_factory=list)
    voice: Voice | None = None  # for a set that hears
    audio_strip: np.ndarray | None = None  # RGB, as wide as the timeline: the voice on the same frames


def spread(frames: int, count: int) -> list[int]:
    """Up to `count` frame positions, evenly spread from the first frame to the last."""
    return sorted({int(i) for i in np.linspace(0, frames - 1, min(frames, count)).round()})


def telling_frames(has_face: np.ndarray, boxes: np.ndarray) -> list[int]:
    """The frames a reader should see: the first without a face, and both sides of the main face's first jump."""
    telling = [int(frame) for frame in np.flatnonzero(~has_face)[:1]]
    jumps = jump_frames(has_face, boxes)
    if len(jumps):
        telling += [int(np.flatnonzero(has_face[: jumps[0]])[-1]), int(jumps[0])]
    return telling


def shown_frames(has_face: np.ndarray, boxes: np.ndarray, count: int) -> list[int]:
    """Up to `count` frames spread over the clip, each telling frame in place of the nearest one spread."""
    positions = spread(len(has_face), count)
    telling = telling_frames(has_face, boxes)
    for frame in telling:
        spare = [position for position in positions if position not in telling]
        if frame not in positions and spare:
            positions.remove(min(spare, key=lambda position: abs(position - frame)))
            positions.append(frame)
    return sorted(positions)


def reachable_video(source_path: str, videos: Path | None) -> tuple[Path | None, str | None]:
    """The clip's source video if it may and can be read, else None and why not.

    Only a file below `videos` (resolved, links followed), the folder the user named, is read:
    a crafted shard could name any file of the machine, whose frames would then travel with
    the page.
    """
    if videos is None:
        return None, "videos not read (name their folder with --videos to show frames)"
    path = Path(source_path)
    if not path.is_absolute():
        return None, (f"source path {shown(source_path)} is not absolute (extract stores absolute paths):"
                      " frames not shown")
    try:
        resolved = path.resolve()
        found = resolved.is_file()
    except (OSError, ValueError, RuntimeError):
        found = False
    if not found:
        return None, f"video not found at {shown(source_path, 200)}: frames not shown"
    if not resolved.is_relative_to(videos):
        return None, f"video {shown(source_path, 200)} is outside --videos {videos}: not read"
    return resolved, None


def clip_sheet(features: FeatureSet, chosen: Chosen, count: int, videos: Path | None) -> ClipSheet:
    """The sheet row of a chosen clip of `features`: `count` frames at most, decoded from its source
    video when that lies below `videos`."""
    crops_stored = bool(features.attrs.get("face_crops_stored"))
    hearing = hears(features.attrs)
    arrays = STORED_ARRAYS + (("face_crop",) if crops_stored else ()) + (AUDIO_ARRAY_NAMES if hearing else ())
    clip = features.read(chosen.clip.clip_id, arrays=arrays)
    positions = shown_frames(clip["has_face"], clip["box"], count)
    cells = [
        Cell(p, float(clip["timestamps"][p]), bool(clip["has_face"][p]), float(clip["score"][p])) for p in positions
    ]
    sheet = ClipSheet(chosen, cells, timeline(clip["has_face"], positions))
    if hearing:
        sheet.voice = Voice(clip["audio"], clip["has_audio"], with_setting_defaults(features.attrs)["audio_bands"],
                            clip["audio_track"])
        sheet.audio_strip = audio_strip(sheet.voice)
    video, problem = reachable_video(chosen.clip.source_path, videos)
    if video is None:
        sheet.notes.append(problem)
    else:
        add_frames(sheet, video, float(features.attrs["fps"]), clip["box"])
    if crops_stored:
        for cell in sheet.cells:
            cell.crop = shown_crop(clip["face_crop"][cell.position]) if cell.has_face else None
    elif video is None or not all(cell.frame is not None for cell in cells):
        sheet.notes.append("this set stores no face crops (extract --save-crops): crops not shown where frames are not")
    return sheet


def add_frames(sheet: ClipSheet, video: Path, fps: float, boxes: np.ndarray) -> None:
    """The sheet's frames decoded again from `video` at the stored times, with their boxes and crops."""
    wanted = {cell.time: cell for cell in sheet.cells}
    last, unusable = max(wanted), 0
    try:
        with closing(sample_frames(video, fps=fps)) as frames:
            for sampled in frames:
                cell = nearest(wanted, sampled.timestamp)
                if cell is not None:
                    box = usable_box(boxes[cell.position], *sampled.image.shape[:2]) if cell.has_face else None
                    unusable += cell.has_face and box is None
                    cell.frame = framed(sampled.image, box)
                    cell.crop = None if box is None else face_crop(sampled.image, box)
                if sampled.timestamp > last + SAME_TIME:
                    break
    except VideoError as exc:
        sheet.notes.append(f"decoding stopped: {exc}")
    if unusable:
        sheet.notes.append(f"{unusable} stored boxes are not numbers or lie far outside their frames: not drawn")
    missing = sum(cell.frame is None for cell in sheet.cells)
    if missing:
        sheet.notes.append(f"{missing} of the {len(sheet.cells)} frames are not at their stored times in {video}"
                           " (changed since the extraction?)")


def nearest(wanted: dict[float, Cell], time: float) -> Cell | None:
    """The cell stored at `time`, if any."""
    best = min(wanted, key=lambda stored: abs(stored - time))
    return wanted[best] if abs(best - time) <= SAME_TIME else None


def usable_box(box: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """A stored box to draw and crop by, or None for values no detector gives (a damaged or crafted shard's):
    not numbers, or further than a frame's size beyond its edges, where no detector's box lies."""
    size = np.array([width, height, width, height])
    return box.astype(np.float32) if ((-size <= box) & (box <= 2 * size)).all() else None


def framed(image: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """`image` scaled to FRAME_HEIGHT high (narrower than MAX_FRAME_WIDTH), with `box` (source pixels) drawn."""
    height, width = image.shape[:2]
    scale = min(FRAME_HEIGHT / height, MAX_FRAME_WIDTH / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
    if box is not None:
        # Drawn as stored, cut at the picture's edges (a box may reach beyond the frame).
        x1, y1, x2, y2 = np.clip(box * scale, -BOX_WIDTH, np.array([*size, *size]) + BOX_WIDTH)
        if x2 > x1 and y2 > y1:
            ImageDraw.Draw(picture).rectangle((x1, y1, x2, y2), outline=BOX_COLOUR, width=BOX_WIDTH)
    return np.asarray(picture)


def face_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The crop the face CNN saw: extract's own square around `box`, FACE_CROP_SIZE pixels."""
    return crop_squares(torch.from_numpy(image)[None], box[None], np.zeros(1, int))[0]


def shown_crop(crop: np.ndarray) -> np.ndarray:
    """A stored crop (S x S, S the set's `face_crop_size`) at FACE_CROP_SIZE pixels."""
    if crop.shape[0] == FACE_CROP_SIZE:
        return crop
    return np.asarray(Image.fromarray(crop).resize((FACE_CROP_SIZE, FACE_CROP_SIZE), Image.Resampling.LANCZOS))


def timeline(has_face: np.ndarray, marked: list[int]) -> np.ndarray:
    """A strip of the clip's frames, green with a face and red without, and a tick under each shown frame."""
    colours = np.where(has_face[:, None], FACE_COLOUR, NO_FACE_COLOUR).astype(np.uint8)[None]
    strip = Image.new("RGB", (TIMELINE_WIDTH, TIMELINE_HEIGHT + MARK_HEIGHT), "white")
    # BOX averages the frames a pixel covers when there are more frames than pixels.
    strip.paste(Image.fromarray(colours).resize((TIMELINE_WIDTH, TIMELINE_HEIGHT), Image.Resampling.BOX))
    draw, step = ImageDraw.Draw(strip), TIMELINE_WIDTH / len(has_face)
    for position in marked:
        middle = (position + 0.5) * step
        draw.polygon([(middle, TIMELINE_HEIGHT), (middle - MARK_HEIGHT, TIMELINE_HEIGHT + MARK_HEIGHT),
                      (middle + MARK_HEIGHT, TIMELINE_HEIGHT + MARK_HEIGHT)], fill=MARK_COLOUR)
    return np.asarray(strip)


def audio_strip(voice: Voice) -> np.ndarray:
    """The voice as a strip over the timeline's frames: the same width, each frame the same columns."""
    picture = Image.fromarray(voice_colours(voice))
    # BOX, as the timeline's: the same frames land on the same columns.
    return np.asarray(picture.resize((TIMELINE_WIDTH, AUDIO_HEIGHT), Image.Resampling.BOX))
