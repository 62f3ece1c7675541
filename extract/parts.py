"""Parts of a split for many machines (extract --num-shards N --shard-index I): balanced by clip
duration, read from the container headers, and the same on every machine."""

from __future__ import annotations

import heapq

from tqdm import tqdm

from extract.settings import ExtractSettings
from extract.video import VideoError, header_duration
from manifests.manifest import ClipEntry


def balanced_parts(durations: dict[str, float], count: int) -> list[list[str]]:
    """Clip ids split into `count` parts of near-equal total duration, the same on every machine.

    Longest first, each to the part with the least duration so far (the lower-numbered part
    on a tie); equal durations are taken in clip id order. Each part lists its ids sorted.
    """
    loads = [(0.0, part) for part in range(count)]
    parts: list[list[str]] = [[] for _ in range(count)]
    for clip_id in sorted(durations, key=lambda clip_id: (-durations[clip_id], clip_id)):
        load, part = heapq.heappop(loads)
        parts[part].append(clip_id)
        heapq.heappush(loads, (load + durations[clip_id], part))
    return [sorted(part) for part in parts]


def clip_durations(entries: list[ClipEntry], progress: bool = True) -> dict[str, float]:
    """Each clip's duration from its file's headers; 0.0 for a file that cannot be read, so it
    still lands in exactly one part, and fails there like in an unsharded run."""
    durations = {}
    bar = tqdm(entries, unit="clip", desc="reading durations", disable=not progress, delay=1)
    for entry in bar:
        try:
            durations[entry.clip_id] = header_duration(entry.path)
        except VideoError:
            durations[entry.clip_id] = 0.0
    return durations


def this_part(entries: list[ClipEntry], settings: ExtractSettings, progress: bool) -> list[ClipEntry]:
    """The clips of this run's part, in manifest order; all of them when the run is not sharded."""
    if settings.num_shards is None:
        return entries
    part = set(balanced_parts(clip_durations(entries, progress), settings.num_shards)[settings.shard_index])
    return [e for e in entries if e.clip_id in part]
