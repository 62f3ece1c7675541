"""Which clips a report shows: a seeded random sample, and the clips most worth a look by stated rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from report.facts import ClipFacts

SAMPLE_SEED = 0  # the same set gives the same sample, so two reports of it can be compared
CLIPS_PER_RULE = 4


@dataclass(frozen=True)
class Rule:
    """Clips worth a look: those `applies` to, most telling first (`order`, then the sets' clip order)."""

    name: str
    caption: str
    applies: Callable[[ClipFacts], bool]
    order: Callable[[ClipFacts], float]


RULES = (
    Rule("no face", "no frame with a face", lambda c: c.faces == 0, lambda c: 0.0),
    Rule("fewest faces", "the lowest face rate among clips with a face in some frames but not all",
         lambda c: 0 < c.faces < c.frames, lambda c: c.face_rate),
    Rule("main face jumps", "the most moves of the main face's box by more than its size from one frame with a"
         " face to the next (a cut, or the main face passing to another person)",
         lambda c: c.jumps > 0, lambda c: -c.jumps),
    Rule("lowest score", "the lowest mean detection score over the frames with a face",
         lambda c: c.faces > 0 and math.isfinite(c.mean_score), lambda c: c.mean_score),
    Rule("shortest", "the fewest sampled frames", lambda c: True, lambda c: c.frames),
)


@dataclass(frozen=True)
class Chosen:
    clip: ClipFacts
    reasons: tuple[str, ...]  # the names of the rules that chose it; empty for the random sample


def sample(clips: list[ClipFacts], count: int) -> list[Chosen]:
    """`count` clips drawn at random (seeded), in the sets' order."""
    picked = np.random.default_rng(SAMPLE_SEED).choice(len(clips), size=min(count, len(clips)), replace=False)
    return [Chosen(clips[i], ()) for i in sorted(picked)]


def worth_a_look(clips: list[ClipFacts]) -> tuple[list[Chosen], dict[str, int]]:
    """Up to CLIPS_PER_RULE clips per rule, each clip once with every rule that chose it, in rule order;
    and how many clips each rule applies to."""
    reasons: dict[int, list[str]] = {}
    applying = {}
    for rule in RULES:
        matching = [i for i, clip in enumerate(clips) if rule.applies(clip)]
        applying[rule.name] = len(matching)
        for i in sorted(matching, key=lambda i: (rule.order(clips[i]), i))[:CLIPS_PER_RULE]:
            reasons.setdefault(i, []).append(rule.name)
    return [Chosen(clips[i], tuple(names)) for i, names in reasons.items()], applying
