"""Stage 1 as a resumable batch job: a manifest split in, complete HDF5 shards and a failures file out.

The contract, as in video feature extractors: skip what exists, save, catch per-clip errors.
- Clips already in complete shards of the output folder are skipped, so re-running the same
  command after a crash (or kill -9) does only the rest; shards appear only on a clean close.
- One clip never stops the run: any error in its decoding, detection, CNNs, assembly or
  storing is recorded in `failures.csv` (features/failures.py) and the run goes on; the
  summary and exit code say so. A listed clip is retried once its file has changed.
- Output made with other settings is refused rather than mixed; one run at a time per folder.

Many machines: `num_shards`/`shard_index` give each of N runs a part of the split, balanced
by clip duration, in its own folder (so the N runs never contend for one folder's lock);
`backend="dask"` sends the same shard-sized tasks to a Dask cluster instead of local processes.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from extract import weights
from extract.clips import clip_failure, embed_clips, load_networks, recipe_of
from extract.embed import Networks, StageError
from extract.parts import this_part
from extract.runtime import keep_freed_memory_for_reuse
from extract.settings import FACE_BACKBONE, ExtractError, ExtractSettings, NetworkChoice, check_options
from features.reader import open_features, write_index
from features.schema import EXTRACTOR_ATTRS, ClipFeatures, shard_files, shard_name, shard_number
from features.writer import ShardWriter, only_writer, writes_into_set
from features.failures import Failure, failures_to_resume, file_stamp, write_failures
from features.recipe import NO_AUDIO_SETTINGS, FeatureRecipe
from manifests.manifest import ClipEntry, ManifestError, missing_file_problems, read_manifest
from outputs import check_output_folder

logger = logging.getLogger(__name__)


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    frames: int = 0
    frames_with_face: int = 0
    frames_with_audio: int | None = None  # None when the recipe does not hear
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    earlier_failures: int = 0  # failed in an earlier run; not retried because the file is unchanged
    videos: Path | None = None  # the folder holding every video of the split (for `features report --videos`)

    def add(self, other: "Summary") -> None:
        self.done += other.done
        self.frames += other.frames
        self.frames_with_face += other.frames_with_face
        if other.frames_with_audio is not None:
            self.frames_with_audio = (self.frames_with_audio or 0) + other.frames_with_audio
        self.failures += other.failures

    def describe(self) -> str:
        faces = f", face found in {self.frames_with_face / self.frames:.0%}" if self.frames else ""
        if self.frames and self.frames_with_audio is not None:
            faces += f", audio in {self.frames_with_audio / self.frames:.0%}"
        earlier = f" ({self.earlier_failures} in an earlier run, files unchanged)" if self.earlier_failures else ""
        return (
            f"{self.done} clips extracted, {self.skipped} already done, {len(self.failures)} failed{earlier};"
            f" {self.frames} frames{faces}; {self.seconds:.1f} s"
        )


def feature_attrs(settings: ExtractSettings, recipe: FeatureRecipe) -> dict:
    """What the extractor gives each shard: where its clips came from and how they were made
    (`recipe`, but the attributes the writer owns).

    A part of a sharded run says which one it is; that is provenance, not a setting, so
    parts stay comparable and merge into one set.
    """
    part = {} if settings.num_shards is None else {"part": f"{settings.shard_index}/{settings.num_shards}"}
    return {
        "split": settings.split,
        "manifest": str(settings.manifest),
        "manifest_sha256": weights.sha256_of(settings.manifest),
        **part,
        **{key: value for key, value in recipe.to_attrs().items() if key in EXTRACTOR_ATTRS},
    }


def _shard_numbers(folder: Path) -> list[int]:
    return sorted(number for p in shard_files(folder) if (number := shard_number(p.name)) is not None)


def _check_same_settings(folder: Path, recipe: FeatureRecipe) -> set[str]:
    """Clip ids already extracted in `folder`, after checking they were made the same way."""
    if not _shard_numbers(folder):
        return set()
    with open_features(folder) as existing:
        earlier = FeatureRecipe.from_attrs(existing.attrs)
        differences = earlier.differences(recipe)
        if differences:
            voice = (" (or give them the voice with `python cli.py features add-audio`)"
                     if not earlier.hears and recipe.hears and earlier.differences(replace(recipe, **NO_AUDIO_SETTINGS)) == []
                     else "")
            raise ExtractError(
                f"{folder} holds features made with other settings ({'; '.join(differences)}):"
                f" use another --out, or the settings they were made with{voice}, or delete that folder to start over"
            )
        return set(existing.clip_ids)


_NETWORKS: dict[NetworkChoice, Networks] = {}
# A Dask worker runs one task per thread: they share its networks, loaded once.
_NETWORKS_LOCK = threading.Lock()


def _networks_for(choice: NetworkChoice) -> Networks:
    """Loaded once per process (each joblib or Dask worker keeps its own)."""
    with _NETWORKS_LOCK:
        if choice not in _NETWORKS:
            _NETWORKS[choice] = load_networks(choice)
            logger.info("networks loaded on %s: RetinaFace %s, face CNN %s, context CNN %s",
                        _NETWORKS[choice].face_cnn.device, choice.detector_backbone, FACE_BACKBONE,
                        _NETWORKS[choice].context_cnn.weights_label)
        return _NETWORKS[choice]


def _prepare_process(settings: ExtractSettings) -> None:
    """Torch threads such that the tasks running at once never oversubscribe the cores, and
    freed memory kept for the next call (`runtime.keep_freed_memory_for_reuse`).

    Local workers split this machine's cores. A Dask worker's threads are the cores it was
    given and it runs one task per thread, so each task's torch gets one thread.
    """
    keep_freed_memory_for_reuse()
    if settings.backend == "dask":
        torch.set_num_threads(1)
    elif settings.workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))


class _NoClipStored(Exception):
    """Leaves a shard writer that took no clip, which then deletes its file."""


def extract_shard(
    settings: ExtractSettings, attrs: dict, entries: list[ClipEntry], shard: Path, on_progress: Callable[[int], None] = lambda n: None
) -> Summary:
    """Extract `entries` into the one shard file `shard` (none if every clip failed).

    `on_progress(n)` is told of every n clips finished, extracted or failed.
    """
    _prepare_process(settings)
    summary = Summary()
    reported = 0

    def report() -> None:
        nonlocal reported
        finished_now = summary.done + len(summary.failures)
        on_progress(finished_now - reported)
        reported = finished_now

    started = time.monotonic()
    # The shard is created with its first clip, and deleted if it ends up holding none.
    with suppress(_NoClipStored), ExitStack() as shard_writer:
        writer = None
        # The attributes hold the recipe but context_dtype, which the writer stores.
        recipe = FeatureRecipe.from_attrs({**attrs, "context_dtype": settings.context_dtype})
        networks = _networks_for(NetworkChoice.of(recipe, settings.device))
        for result in embed_clips(entries, networks, recipe, settings.batch_size, settings.save_crops):
            if isinstance(result, ClipFeatures):
                if writer is None:
                    writer = shard_writer.enter_context(
                        ShardWriter(shard, attrs, settings.context_dtype, store_face_crops=settings.save_crops))
                result = _stored(writer, result)
            if isinstance(result, Failure):
                summary.failures.append(result)
            else:
                summary.done += 1
                summary.frames += len(result.timestamps)
                summary.frames_with_face += int(result.has_face.sum())
                logger.info("%s: %d frames sampled, a face in %d%s", result.clip_id, len(result.timestamps),
                            result.has_face.sum(), heard_line(result))
                if result.has_audio is not None:
                    summary.frames_with_audio = (summary.frames_with_audio or 0) + int(result.has_audio.sum())
            report()
        if writer is not None and not writer.n_clips:
            raise _NoClipStored
    report()
    logger.info("%s: %d clips, %d frames, %d failed, in %.1f s (process %d, torch threads %d)",
                shard.name if summary.done else "(no shard)", summary.done, summary.frames, len(summary.failures),
                time.monotonic() - started, os.getpid(), torch.get_num_threads())
    return summary


def heard_line(clip: ClipFeatures) -> str:
    """What -v says of a clip's voice: the frames it covered and its track's note."""
    if clip.has_audio is None:
        return ""
    track = clip.audio_track
    source = f"{track.codec} {track.rate} Hz, {track.channels} channel(s)" if track.codec else "no track"
    return f", audio in {int(clip.has_audio.sum())} ({source}{'; ' + track.note if track.note and track.codec else ''})"


def _shard_task(settings: ExtractSettings, attrs: dict, entries: list[ClipEntry], shard: Path):
    """The joblib task extracting one shard. A Dask worker logs as its cluster does; a local
    worker as this process (`-v`)."""
    if settings.backend == "dask":
        return delayed(extract_shard)(settings, attrs, entries, shard)
    root = logging.getLogger()
    formatter = root.handlers[0].formatter if root.handlers else None
    return delayed(_extract_shard_logged)(root.getEffectiveLevel(), formatter, settings, attrs, entries, shard)


def _extract_shard_logged(level: int, formatter: logging.Formatter | None, *args) -> Summary:
    """`extract_shard` in a local worker process: it writes to the command's stderr, but a fresh
    process has no log handler of its own, so without one `-v` would show nothing of its clips."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level)
    return extract_shard(*args)


def _stored(writer: ShardWriter, clip: ClipFeatures) -> ClipFeatures | Failure:
    """`clip` once the shard holds it, or its failure when the writer refuses its arrays (a
    ValueError, and nothing of the clip written). Other errors of the writer stop the run: the
    shard can then hold no clip more."""
    try:
        writer.add_clip(clip)
    except ValueError as exc:
        return clip_failure(clip.clip_id, Path(clip.source_path), StageError("store", exc))
    return clip


def _shard_clips(settings: ExtractSettings, pending: int) -> int:
    """Clips per shard: --shard-size, but small enough that every local worker gets a shard."""
    if settings.backend == "local" and settings.workers > 1:
        return max(1, min(settings.shard_size, math.ceil(pending / settings.workers)))
    return settings.shard_size


def _chunks(entries: list[ClipEntry], size: int) -> list[list[ClipEntry]]:
    return [entries[i : i + size] for i in range(0, len(entries), size)]


def _entries_to_extract(settings: ExtractSettings, progress: bool, log: Callable[[str], None]) -> list[ClipEntry]:
    """The clips of the split (or of this run's part of it). Missing files are reported up
    front and then recorded as failures, so one lost file does not block thousands; if every
    file of the split is missing the paths are wrong."""
    entries = read_manifest(settings.manifest, split=settings.split, check_files=False)
    missing = missing_file_problems(entries)
    if entries and len(missing) == len(entries):
        shown = missing[:5] + ([f"... and {len(missing) - 5} more"] if len(missing) > 5 else [])
        raise ManifestError(
            f"manifest {settings.manifest}: none of the {len(entries)} files of split {settings.split!r} exists",
            shown,
            "Fix: paths are absolute or relative to the manifest's folder; rebuild the manifest where the videos are.",
        )
    part = this_part(entries, settings, progress)
    if part is not entries:
        entries, missing = part, missing_file_problems(part)
    if missing:
        log(f"warning: {len(missing)} of {len(entries)} clips are missing; they will be listed in failures.csv:")
        for line in missing:
            log(f"  {line}")
    return entries


def extract_split(settings: ExtractSettings, progress: bool = True, log: Callable[[str], None] = print) -> Summary:
    """Extract every clip of the split that is not yet in the output folder."""
    started = time.monotonic()
    check_options(settings)
    # Absolute, because Dask workers may run with another working folder (on a shared file system).
    folder = check_output_folder(settings.folder.absolute(), "extract", settings.overwrite, writes_into_set)
    entries = _entries_to_extract(settings, progress, log)
    recipe = recipe_of(settings)
    attrs = feature_attrs(settings, recipe)
    with only_writer(folder):
        done_ids = _check_same_settings(folder, recipe)
        known_failures = {f.clip_id: f for f in failures_to_resume(folder, log)}
        unchanged = {
            e.clip_id
            for e in entries
            if e.clip_id in known_failures and known_failures[e.clip_id].file_stamp == file_stamp(e.path)
            and e.clip_id not in done_ids
        }
        pending = [e for e in entries if e.clip_id not in done_ids and e.clip_id not in unchanged]
        summary = Summary(skipped=len(entries) - len(pending) - len(unchanged), earlier_failures=len(unchanged))
        summary.failures = [known_failures[i] for i in sorted(unchanged)]
        logger.info("%s: %d clips in the split, %d done earlier, %d failed earlier with unchanged files;"
                    " %d to extract with %d worker(s), torch threads %d", folder, len(entries), len(done_ids),
                    len(unchanged), len(pending), settings.workers, torch.get_num_threads())
        first_number = (_shard_numbers(folder) or [-1])[-1] + 1
        jobs = [
            (chunk, folder / shard_name(first_number + i))
            for i, chunk in enumerate(_chunks(pending, _shard_clips(settings, len(pending))))
        ]
        bar = tqdm(total=len(pending), unit="clip", desc=f"extract {settings.split}", disable=not progress)
        with bar, _parallel_backend(settings, jobs) as n_jobs:
            if n_jobs == 1:
                results = (extract_shard(settings, attrs, chunk, shard, bar.update) for chunk, shard in jobs)
            else:
                # One call per task, so each task writes exactly one shard.
                results = Parallel(n_jobs=n_jobs, batch_size=1, return_as="generator_unordered")(
                    _shard_task(settings, attrs, chunk, shard) for chunk, shard in jobs
                )
            for result in results:
                summary.add(result)
                if n_jobs != 1:
                    bar.update(result.done + len(result.failures))
                write_index(folder)
        write_failures(folder, summary.failures)
    summary.seconds = time.monotonic() - started
    summary.videos = Path(os.path.commonpath([entry.path.parent for entry in entries])) if entries else None
    return summary


@contextmanager
def _parallel_backend(settings: ExtractSettings, jobs: list) -> Iterator[int]:
    """joblib's n_jobs for these jobs: local processes, or every thread of the Dask cluster
    (connected only when there is work to send)."""
    if settings.backend != "dask" or not jobs:
        yield settings.workers
        return
    from distributed import Client

    try:
        client = Client(settings.scheduler)
    except (OSError, TimeoutError, ValueError) as exc:
        raise ExtractError(f"cannot reach the Dask scheduler at {settings.scheduler} ({exc}); check --scheduler") from None
    with client, parallel_config(backend="dask"):
        yield -1
