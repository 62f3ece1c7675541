"""One picture per predicted clip: what the model saw, where it looked, and what it decided.

Top: up to MAX_FRAMES_SHOWN sampled frames, evenly spread over the clip, with the main face's box.
Under them, when the run's features hear: the clip's stored audio over its time (report/audio.py),
one column per sampled frame, grey where a frame has no audio, the frames shown above marked.
Bottom left, for the CACA models: the attention the second RNN put, at each of its steps, on
every step of the first RNN. Bottom right: the class probabilities.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from extract.video import sample_frames
from features.schema import ClipFeatures
from outputs import write_atomically
from report.audio import Voice, voice_colours
from report.figures import text

if TYPE_CHECKING:  # predict.predict imports this module
    from predict.predict import Prediction

MAX_FRAMES_SHOWN = 8
FIGURE_WIDTH = 16  # inches, at 100 dpi
LOWER_ROW_HEIGHT = 5.5  # inches: attention and probabilities
AUDIO_ROW_HEIGHT = 2.2  # inches: the audio strip, its title and its time axis
MAX_SCALE_CHARS = 160  # of the audio's caption, which may quote a note from the file
MAX_ID_CHARS = 80  # of a clip id in the title
FRAME_TITLES_HEIGHT = 1.0  # inches above the frames: caption and times
MAX_FRAME_HEIGHT = 4.0
# Longest side of a shown frame, in pixels: a face box stays visible, the figure stays small.
THUMBNAIL_SIDE = 320
# Above this many steps the weights are no longer written in the attention cells (too small to read).
MAX_LABELLED_STEPS = 12
MAX_TIME_TICKS = 10
FACE_COLOUR = "lime"
NO_FACE_COLOUR = "crimson"
PREDICTED_COLOUR = "tab:orange"
OTHER_COLOUR = "silver"


@dataclass(frozen=True)
class Thumbnail:
    index: int  # position among the clip's sampled frames
    image: np.ndarray  # RGB uint8, downscaled
    scale: float  # thumbnail pixels per source pixel: face boxes are in source pixels


def frames_to_show(count: int) -> list[int]:
    """Up to MAX_FRAMES_SHOWN frame positions, evenly spread from the first to the last."""
    return sorted({int(i) for i in np.linspace(0, count - 1, min(count, MAX_FRAMES_SHOWN)).round()})


def thumbnails(video: Path, fps: float, count: int) -> list[Thumbnail]:
    """The frames to show of a clip whose `count` frames were sampled at `fps`, decoded again."""
    wanted = set(frames_to_show(count))
    shown = []
    with closing(sample_frames(video, fps=fps)) as frames:
        for sampled in frames:
            if sampled.index in wanted:
                shown.append(downscaled(sampled.index, sampled.image))
            if len(shown) == len(wanted):
                break
    return shown


def downscaled(index: int, image: np.ndarray) -> Thumbnail:
    scale = min(1.0, THUMBNAIL_SIDE / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return Thumbnail(index, np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)), scale)


def explain_clip(
    path: Path,
    frames: list[Thumbnail],
    timestamps: np.ndarray,
    boxes: np.ndarray,
    prediction: Prediction,
    classes: list[str],
    model_name: str,
    attention_streams: tuple[str, str] | None,
    steps_frame_index: np.ndarray,
    clip: ClipFeatures | None = None,
    audio_bands: int = 0,
) -> Path:
    """Write the clip's picture to `path` (a PNG); `boxes` (T, 4) are NaN where no face was found. The extracted
    `clip` gives its audio when the run's features hear (their recipe's `audio_bands`)."""
    figure = explanation(frames, timestamps, boxes, prediction, classes, model_name, attention_streams,
                         steps_frame_index, None if clip is None else Voice.of(clip, audio_bands))
    path = Path(path)
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


def explanation(frames: list[Thumbnail], timestamps: np.ndarray, boxes: np.ndarray, prediction: Prediction,
                classes: list[str], model_name: str, attention_streams: tuple[str, str] | None,
                steps_frame_index: np.ndarray,
                voice: Voice | None = None) -> Figure:
    """The clip's picture, as `explain_clip` writes it."""
    rows = [frames_row_height(frames), *([AUDIO_ROW_HEIGHT] if voice is not None else []), LOWER_ROW_HEIGHT]
    figure = Figure(figsize=(FIGURE_WIDTH, sum(rows)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title(prediction, model_name), fontsize=16, fontweight="bold")
    top, *middle, bottom = figure.subfigures(len(rows), 1, height_ratios=rows)
    draw_frames(top, frames, timestamps, boxes, len(steps_frame_index))
    if voice is not None:
        draw_voice(middle[0].subplots(), voice, np.asarray(timestamps), [frame.index for frame in frames])
    attention_axes, probability_axes = bottom.subplots(1, 2, width_ratios=[1.6, 1])
    if prediction.attention is None:
        draw_no_attention(attention_axes, model_name)
    else:
        draw_attention(attention_axes, prediction.attention, np.asarray(timestamps)[steps_frame_index],
                       *attention_streams)
    draw_probabilities(probability_axes, prediction, classes)
    return figure


def frames_row_height(frames: list[Thumbnail]) -> float:
    """Inches for the row of frames: as tall as the frames drawn side by side across the figure."""
    height, width = frames[0].image.shape[:2]
    return FRAME_TITLES_HEIGHT + min(MAX_FRAME_HEIGHT, FIGURE_WIDTH / len(frames) * height / width)


def title(prediction: Prediction, model_name: str) -> str:
    """The picture's title: the clip id and class names come from files, so `text` keeps matplotlib from reading
    them as maths (an id with one `$` would stop the picture)."""
    share = prediction.probabilities[prediction.predicted]
    return (f"{text(prediction.clip_id, MAX_ID_CHARS)}: predicted {text(prediction.predicted)} ({share:.0%}) by model"
            f" {model_name!r}")


def frames_caption(shown: int, boxes: np.ndarray, steps: int) -> str:
    """What the row of frames shows, and which frames the model's `steps` were (train/data.py's policy)."""
    found = int((~np.isnan(boxes).any(axis=1)).sum())
    if not found:
        return (f"{shown} of the {len(boxes)} sampled frames. NO FACE FOUND in any frame:"
                " the model used every frame, with empty face features")
    if steps == found:
        return (f"{shown} of the {len(boxes)} sampled frames (face found in {found}; the model saw only those)."
                " Green box: the face the model used")
    return (f"{shown} of the {len(boxes)} sampled frames (face found in {found}; the model used every frame)."
            " Green box: the face found")


def draw_frames(figure, frames: list[Thumbnail], timestamps: np.ndarray, boxes: np.ndarray, steps: int) -> None:
    figure.suptitle(frames_caption(len(frames), boxes, steps), fontsize=12)
    for axes, frame in zip(np.atleast_1d(figure.subplots(1, len(frames))), frames):
        axes.imshow(frame.image)
        box = boxes[frame.index]
        found = not np.isnan(box).any()
        if found:
            x1, y1, x2, y2 = box * frame.scale
            axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=FACE_COLOUR, linewidth=2))
        axes.set_title(f"{timestamps[frame.index]:.1f} s" + ("" if found else "\nno face"),
                       color="black" if found else NO_FACE_COLOUR, fontsize=11)
        axes.set_axis_off()


def draw_voice(axes, voice: Voice, timestamps: np.ndarray, shown: list[int]) -> None:
    """The audio over the clip's time: each sampled frame a column from halfway to the frame before to halfway to
    the next, the frames shown above ticked with their times."""
    edges = frame_edges(timestamps)
    picture = voice_colours(voice)
    # pcolormesh puts the mesh's first row at the bottom, where the picture has it last.
    axes.pcolormesh(edges, np.arange(picture.shape[0] + 1), picture[::-1])
    axes.set_xlim(edges[0], edges[-1])
    axes.set_xticks(timestamps[shown], labels=[f"{timestamps[i]:.1f} s" for i in shown])
    axes.set_yticks([])
    axes.set_ylabel("low  ->  high" if voice.bands else "first  ->  last", fontsize=9)
    axes.set_title(f"Audio, mean per sampled frame ({text(voice.scale(), MAX_SCALE_CHARS)}); ticks: the frames shown"
                   " above", fontsize=11)


def frame_edges(timestamps: np.ndarray) -> np.ndarray:
    """(T + 1,) seconds: where each sampled frame's column starts and ends, halfway to its neighbours (the first and
    last as wide as the mean step; a lone frame's, which fills the axes whatever its width, one second)."""
    step = np.diff(timestamps).mean() if len(timestamps) > 1 else 1.0
    return np.concatenate([[timestamps[0] - step / 2], (timestamps[1:] + timestamps[:-1]) / 2,
                           [timestamps[-1] + step / 2]])


def draw_attention(axes, attention: np.ndarray, step_times: np.ndarray, attended: str, attending: str) -> None:
    """Rows: the second RNN's steps (it reads the `attending` streams); columns: the first RNN's steps (the
    `attended` stream) it attends over; both in time order."""
    image = axes.imshow(attention, cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    axes.figure.colorbar(image, ax=axes, label="attention weight (each row sums to 1)")
    if len(step_times) <= MAX_LABELLED_STEPS:
        write_weights(axes, attention)
    ticks = np.unique(np.linspace(0, len(step_times) - 1, min(len(step_times), MAX_TIME_TICKS)).round().astype(int))
    labels = [f"{step_times[i]:.1f} s" for i in ticks]
    axes.set_xticks(ticks, labels=labels, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(ticks, labels=labels)
    axes.set_xlabel(f"{attended} frame attended to (time in the clip)")
    axes.set_ylabel(f"{attending} RNN step (time in the clip)")
    even = 1 / len(step_times)
    axes.set_title(f"Where the {attending} RNN looked: at each of its steps (row), its attention\n"
                   f"over the {attended} frames (columns); even attention would be {even:.2f} each")


def write_weights(axes, attention: np.ndarray) -> None:
    for row, column in np.ndindex(attention.shape):
        # Dark text on the bright (high) end of viridis, light text on the dark end.
        colour = "black" if attention[row, column] > 0.6 * attention.max() else "white"
        axes.text(column, row, f"{attention[row, column]:.2f}", ha="center", va="center", color=colour, fontsize=9)


def draw_no_attention(axes, model_name: str) -> None:
    axes.set_axis_off()
    axes.text(0.5, 0.5, f"no attention in model {model_name!r}\n(only the CACA models attend over time)",
              ha="center", va="center", fontsize=13, color="dimgray", transform=axes.transAxes)


def draw_probabilities(axes, prediction: Prediction, classes: list[str]) -> None:
    probabilities = [prediction.probabilities[name] for name in classes]
    colours = [PREDICTED_COLOUR if name == prediction.predicted else OTHER_COLOUR for name in classes]
    rows = np.arange(len(classes))
    axes.barh(rows, probabilities, color=colours)
    for row, p in zip(rows, probabilities):
        axes.text(p + 0.01, row, f"{p:.0%}", va="center", fontsize=10)
    axes.set_yticks(rows, labels=classes)
    axes.invert_yaxis()  # first class at the top, as read
    axes.set_xlim(0, 1.1)
    axes.set_xlabel("probability")
    axes.set_title(f"What the model predicts (highlighted: {prediction.predicted})")
