"""What a report says of a feature set, read cheaply: `features inspect`'s summary, one line of facts per
clip (from the clip tables, has_face, scores and boxes: never the features), labels and failures."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features import tools
from features.failures import STAGES, CorruptFailuresFile, Failure, read_failures
from features.layout import FAILURES_FILE
from features.reader import FeatureSet, absolute, open_features

# What is read of every clip: enough to draw the overview and to choose the clips worth a look.
CLIP_ARRAYS = ("has_face", "score", "box")


@dataclass(frozen=True)
class ClipFacts:
    """One clip as the overview and the choice of clips to show need it."""

    folder: int  # position of its feature set among the report's
    clip_id: str
    label: str | None
    source_path: str
    duration: float
    frames: int
    faces: int  # frames with a face
    mean_score: float  # the detector's mean score over the frames with a face; NaN without any
    jumps: int  # moves of the main face's box by more than its size (`jump_frames`)

    @property
    def face_rate(self) -> float:
        return self.faces / self.frames


@dataclass(frozen=True)
class FailuresFile:
    """A failures file of a set's folders: the clips it lists, or why it cannot be read."""

    path: Path
    failures: list[Failure]
    unreadable: str | None = None


@dataclass(frozen=True)
class SetFacts:
    path: Path
    summary: tools.InspectSummary  # what `features inspect` says, so that the page's numbers are inspect's
    attrs: dict  # the attributes every shard shares
    clips: list[ClipFacts]
    scores: np.ndarray  # the detector's score of every frame with a face
    labels: dict[str, int]  # label -> clips, in the class order ("unlabelled" last)
    failures: list[FailuresFile]

    @property
    def stages(self) -> dict[str, int]:
        """Failed clips per stage, in the order a clip goes through them."""
        counts = Counter(failure.stage for file in self.failures for failure in file.failures)
        return {stage: counts[stage] for stage in STAGES}


def jump_frames(has_face: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The frames where the main face's box centre lies further than the box's side (the mean of the two
    boxes' longer sides) from where it was in the last frame with a face: a cut, or the main face
    passing to another person. Boxes that are not finite (a damaged shard) never count."""
    with_face = np.flatnonzero(has_face)
    rows = boxes[with_face].astype(np.float64)
    centres = (rows[:, :2] + rows[:, 2:]) / 2
    sides = (rows[:, 2:] - rows[:, :2]).max(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        moved = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        return with_face[1:][moved > (sides[1:] + sides[:-1]) / 2]


def clip_facts(features: FeatureSet, folder: int, clip_id: str) -> tuple[ClipFacts, np.ndarray]:
    """A clip's facts and the detector's scores of its frames with a face."""
    clip = features.read(clip_id, arrays=CLIP_ARRAYS)
    has_face = clip["has_face"]
    scores = clip["score"][has_face]
    facts = ClipFacts(
        folder=folder,
        clip_id=clip_id,
        label=clip["label"],
        source_path=clip["source_path"],
        duration=clip["duration"],
        frames=len(has_face),
        faces=int(np.count_nonzero(has_face)),
        mean_score=float(scores.mean(dtype=np.float64)) if len(scores) else float("nan"),
        jumps=len(jump_frames(has_face, clip["box"])),
    )
    return facts, scores




def failures_files(path: Path) -> list[FailuresFile]:
    """The failures file of each folder of the set (a merged folder stands for its parts) that lists any
    clip or cannot be read, as `features inspect` counts them."""
    if not path.is_dir():
        return []
    found = []
    for folder in tools.source_folders(path):
        file = folder / FAILURES_FILE
        try:
            failures = read_failures(file)
        except CorruptFailuresFile as exc:
            found.append(FailuresFile(file, [], exc.reason))
            continue
        if failures:
            found.append(FailuresFile(file, failures))
    return found


def read_set(path: Path, folder: int) -> SetFacts:
    """The facts of the feature set at `path` (a folder or a shard), the report's `folder`-th set."""
    path = absolute(path)
    summary = tools.inspect_summary(path)
    with open_features(path) as features:
        clips, scores = [], []
        for clip_id in features.clip_ids:
            facts, clip_scores = clip_facts(features, folder, clip_id)
            clips.append(facts)
            scores.append(clip_scores)
        return SetFacts(
            path=path,
            summary=summary,
            attrs=features.attrs,
            clips=clips,
            scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
            labels=tools.label_counts(features.labels, list(features.attrs["classes"])),
            failures=failures_files(path),
        )
