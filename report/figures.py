"""The overview plots of a report, one PNG each, every feature set side by side (matplotlib, Agg, no pyplot)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from features.failures import STAGES
from report.facts import SetFacts

SETS_PER_ROW = 4
PANEL_WIDTH, PANEL_HEIGHT = 4.2, 3.0  # inches, at DPI
DPI = 100
BAR_COLOUR, EMPTY_COLOUR, THRESHOLD_COLOUR = "tab:blue", "tab:red", "black"
MAX_TICK_CHARS = 24
SCORE_BINS = 40
MAX_LENGTH_BARS = 60  # one bar per length up to this many frames, else this many bars


@dataclass(frozen=True)
class Overview:
    file: str  # the PNG's name in the report's folder
    title: str
    caption: str  # what to look for, one line
    draw: Callable  # (axes, SetFacts) -> None


def text(value: str, limit: int = MAX_TICK_CHARS) -> str:
    """A string from a file as matplotlib shows it: cut to `limit` characters, and never read as mathtext."""
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return value.replace("$", r"\$")


def empty(axes, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="dimgray")
    axes.set_xticks([])
    axes.set_yticks([])


def face_rates(axes, facts: SetFacts) -> None:
    rates = np.array([clip.face_rate for clip in facts.clips])
    bins = np.linspace(0, 1, 21)
    _, _, bars = axes.hist(rates, bins=bins, color=BAR_COLOUR, edgecolor="white")
    bars[0].set_color(EMPTY_COLOUR)  # clips with (almost) no face
    axes.set_xlabel("share of the clip's frames with a face")
    axes.set_ylabel("clips")


def scores(axes, facts: SetFacts) -> None:
    finite = facts.scores[np.isfinite(facts.scores)]
    if not len(finite):
        empty(axes, "no frame has a face")
        return
    threshold = facts.attrs.get("detector_threshold")
    shown = isinstance(threshold, (int, float)) and 0 <= threshold < 1
    # Scores are probabilities above the detector's threshold: bins fixed from there to 1, so that scores
    # all near 1 make one tall bar rather than a range of their own.
    low = threshold if shown else 0.0
    axes.hist(np.clip(finite, low, 1), bins=np.linspace(low, 1, SCORE_BINS + 1), color=BAR_COLOUR,
              edgecolor="white")
    if shown:
        axes.axvline(threshold, color=THRESHOLD_COLOUR, linestyle="--", label=f"threshold {threshold:g}")
        axes.legend(loc="upper left")
    axes.set_xlabel("detection score of the main face")
    axes.set_ylabel("frames")


def lengths(axes, facts: SetFacts) -> None:
    frames = np.array([clip.frames for clip in facts.clips])
    bins = np.arange(0.5, frames.max() + 1.5) if frames.max() <= MAX_LENGTH_BARS else MAX_LENGTH_BARS
    axes.hist(frames, bins=bins, color=BAR_COLOUR, edgecolor="white")
    axes.set_xlabel(f"sampled frames per clip (at {facts.attrs['fps']:g} fps)")
    axes.set_ylabel("clips")


def labels(axes, facts: SetFacts) -> None:
    names = list(facts.labels)
    axes.bar(range(len(names)), list(facts.labels.values()), color=BAR_COLOUR)
    axes.set_xticks(range(len(names)), [text(name) for name in names], rotation=45, ha="right")
    axes.set_ylabel("clips")


def failures(axes, facts: SetFacts) -> None:
    counts = facts.stages
    unreadable = sum(file.unreadable is not None for file in facts.failures)
    if not any(counts.values()):
        empty(axes, "an unreadable failures file (see above)" if unreadable else "no failures recorded")
        return
    axes.bar(range(len(STAGES)), [counts[stage] for stage in STAGES], color=EMPTY_COLOUR)
    axes.set_xticks(range(len(STAGES)), STAGES)
    axes.set_ylabel("failed clips")


OVERVIEWS = (
    Overview("face-rate.png", "Face rate per clip",
             "Most clips should sit at the right; a red bar at the left means clips with almost no face found"
             " (wrong video, faces too small, turned away or covered).", face_rates),
    Overview("scores.png", "Detection scores",
             "The detector's score on every frame with a face: many near the threshold mean doubtful faces,"
             " which may be something else.", scores),
    Overview("frames.png", "Sampled frames per clip",
             "Clip lengths as sampled: a pile-up at one or two frames means clips cut short or decoded in part.",
             lengths),
    Overview("labels.png", "Labels",
             "Clips per label: check that every class you expect is there, and how unbalanced they are.", labels),
    Overview("failures.png", "Failed clips by stage",
             "Clips the extractor could not extract, by where they failed (decode: the file itself; the"
             " messages are above).", failures),
)


def overview_png(overview: Overview, sets: list[SetFacts], names: list[str]) -> bytes:
    """One panel per feature set, SETS_PER_ROW to a row, as PNG bytes."""
    columns = min(len(sets), SETS_PER_ROW)
    rows = math.ceil(len(sets) / columns)
    figure = Figure(figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(overview.title, fontweight="bold")
    panels = np.atleast_1d(figure.subplots(rows, columns, squeeze=False).ravel())
    for axes, facts, name in zip(panels, sets, names):
        axes.set_title(text(name))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of clips or frames
        if facts.clips:
            overview.draw(axes, facts)
        else:
            empty(axes, "no clips")
    for axes in panels[len(sets):]:
        axes.set_visible(False)
    data = io.BytesIO()
    figure.savefig(data, format="png")
    return data.getvalue()
