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

import heapq
import importlib
import logging
import math
import os
import threading
import time
from collections import deque
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from joblib import Parallel, delayed, parallel_config
from tqdm import tqdm

from extract import faces, face_cnn, retinaface, weights
from extract.context_cnn import CONTEXT_SIZE, IMAGENET_MEAN, IMAGENET_STD, ContextCNN
from extract.ahead import ahead
from extract.embed import ClipInProgress, Embedder, Networks, StageError, finished
from extract.face_cnn import FaceCNN
from extract.retinaface import RetinaFaceDetector
from extract.runtime import keep_freed_memory_for_reuse
from extract.settings import (
    BACKBONES, BACKENDS, DEFAULT_CONTEXT_BACKBONE, DEFAULT_FPS, DEFAULT_MANIFEST, DEFAULT_PRECISION,
)
from extract.video import VideoError, VideoInfo, header_duration, probe, sample_frames
from features import ClipFeatures, ShardWriter, open_features
from features.failures import Failure, failures_to_resume, file_stamp, one_line, write_failures
from features.labels import CHEAVD_CLASSES
from features.layout import DEFAULT_ROOT, PART_FOLDER
from features.reader import write_index
from features.writer import only_writer, shard_attrs, writes_into_set
from features.schema import comparable, shard_files, shard_name, shard_number
from manifests.manifest import ClipEntry, ManifestError, missing_file_problems, read_manifest
from outputs import check_output_folder, check_plain_name

logger = logging.getLogger(__name__)
# Windows of sampled frames the decoder may run ahead of the networks: enough to keep both
# busy, few enough that memory stays flat (a window is --batch-size frames, see WINDOW_BYTES).
DECODE_AHEAD = 1
# A window also holds at most this many bytes of frames (one frame at least): 64 frames of an
# 8K clip are 6.4 GB, and about three windows are alive at once (decoded ahead, being stacked,
# being detected). Windows of 640x360 to 1280x720 clips keep their 64 frames (177 MB at 720p),
# so their batches, and features, are unchanged; 1080p gets 43 frames, 4K 10, 8K 2.
WINDOW_BYTES = 256 << 20
DASK_INSTALL = "pip install 'caca-rnn[dask]'"


class ExtractError(Exception):
    """A problem with the run's inputs or output folder that the user can fix; one line."""


@dataclass(frozen=True)
class ExtractSettings:
    split: str
    manifest: Path = DEFAULT_MANIFEST
    out: Path = DEFAULT_ROOT
    fps: float = DEFAULT_FPS
    context_backbone: str = DEFAULT_CONTEXT_BACKBONE
    detector_backbone: str = "mobilenet0.25"
    detector_threshold: float = retinaface.DEFAULT_SCORE_THRESHOLD
    detect_every: int = 1  # full detection on every k-th sampled frame, tracking between; 1: the paper's
    device: str | None = None
    batch_size: int = 64
    shard_size: int = 64
    workers: int = 1
    context_dtype: str = "float16"
    save_crops: bool = False
    precision: str = DEFAULT_PRECISION
    num_shards: int | None = None
    shard_index: int | None = None
    backend: str = "local"
    scheduler: str | None = None
    overwrite: bool = False  # write into a folder holding more than a feature set's files

    @property
    def folder(self) -> Path:
        if self.num_shards is None:
            return self.out / self.split
        return self.out / self.split / PART_FOLDER.format(index=self.shard_index, count=self.num_shards)


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    frames: int = 0
    frames_with_face: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    earlier_failures: int = 0  # failed in an earlier run; not retried because the file is unchanged

    def add(self, other: "Summary") -> None:
        self.done += other.done
        self.frames += other.frames
        self.frames_with_face += other.frames_with_face
        self.failures += other.failures

    def describe(self) -> str:
        faces = f", face found in {self.frames_with_face / self.frames:.0%}" if self.frames else ""
        earlier = f" ({self.earlier_failures} in an earlier run, files unchanged)" if self.earlier_failures else ""
        return (
            f"{self.done} clips extracted, {self.skipped} already done, {len(self.failures)} failed{earlier};"
            f" {self.frames} frames{faces}; {self.seconds:.1f} s"
        )


def feature_attrs(settings: ExtractSettings) -> dict:
    """Everything another team needs to tell whether two feature sets are comparable.

    A part of a sharded run says which one it is; that is provenance, not a setting, so
    parts stay comparable and merge into one set.
    """
    part = {} if settings.num_shards is None else {"part": f"{settings.shard_index}/{settings.num_shards}"}
    return {
        "split": settings.split,
        "manifest": str(settings.manifest),
        "manifest_sha256": weights.sha256_of(settings.manifest),
        **part,
        **setting_attrs(settings),
    }


def check_options(settings: ExtractSettings) -> None:
    """The option combinations a user can get wrong, as one-line ExtractErrors, before any work."""
    check_plain_name(settings.split, "split")
    if (settings.num_shards is None) != (settings.shard_index is None):
        raise ExtractError("--num-shards and --shard-index go together: give both (e.g. --num-shards 3 --shard-index 0)")
    if settings.num_shards is not None and not 0 <= settings.shard_index < settings.num_shards:
        raise ExtractError(
            f"--shard-index {settings.shard_index} is outside 0..{settings.num_shards - 1} (--num-shards {settings.num_shards})"
        )
    if settings.backend not in BACKENDS:
        raise ExtractError(f"--backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.backend == "local" and settings.scheduler is not None:
        raise ExtractError("--scheduler is used only with --backend dask")
    if settings.backend == "dask":
        if settings.scheduler is None:
            raise ExtractError("--backend dask needs --scheduler ADDRESS (e.g. tcp://10.0.0.5:8786)")
        if settings.workers > 1:
            raise ExtractError("--workers is for the local backend; with --backend dask the cluster's workers run the tasks")
        try:
            importlib.import_module("distributed")
        except ImportError:
            raise ExtractError(f"--backend dask needs Dask's distributed package: {DASK_INSTALL}") from None


def setting_attrs(settings: ExtractSettings) -> dict:
    """How `settings` make features on this machine (its weights' hashes), whichever clips they read."""
    detector_weight = retinaface.VARIANTS[settings.detector_backbone].weight_name
    context = BACKBONES[settings.context_backbone]
    return {
        "fps": settings.fps,
        "face_crop_size": faces.FACE_CROP_SIZE,
        "face_crop_scale": faces.FACE_CROP_SCALE,
        "context_size": CONTEXT_SIZE,
        "detector": detector_weight,
        "detector_weights_sha256": weights.sha256_of(weights.verified_path(detector_weight)),
        "detector_threshold": settings.detector_threshold,
        "detector_max_side": faces.DETECT_MAX_SIDE,
        "detect_every": settings.detect_every,
        "main_face": {"switch_penalty": faces.SWITCH_PENALTY, "size_weight": faces.SIZE_WEIGHT,
                      "no_face_gain": faces.NO_FACE_GAIN},
        "face_backbone": face_cnn.WEIGHT_NAME,
        "face_weights_sha256": weights.sha256_of(weights.verified_path(face_cnn.WEIGHT_NAME)),
        "context_backbone": context.name,
        "context_weights_sha256": weights.sha256_of(weights.verified_path(context.weight_name)),
        "context_dim": context.feature_dim,
        "context_pooling": context.pooling,
        "normalisation": {
            "detector": "BGR minus per-channel means " + str(retinaface.BGR_MEAN),
            "face": f"ITU-R 601 gray, {face_cnn.FACE_CNN_INPUT_SIZE}x{face_cnn.FACE_CNN_INPUT_SIZE}, (x/255-0.5)*2",
            "context": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        },
        "classes": list(CHEAVD_CLASSES),
        "precision": settings.precision,
    }


def load_networks(settings: ExtractSettings) -> Networks:
    return Networks(
        detector=RetinaFaceDetector(settings.detector_backbone, device=settings.device,
                                    score_threshold=settings.detector_threshold, precision=settings.precision),
        face_cnn=FaceCNN(device=settings.device, precision=settings.precision),
        context_cnn=ContextCNN(settings.context_backbone, device=settings.device, precision=settings.precision),
    )


def _windows(path: Path, fps: float, size: int) -> Iterator[tuple[np.ndarray, list[float]]]:
    """The clip's sampled frames in windows of `size` frames, or fewer when they would exceed WINDOW_BYTES."""
    frames, stamps = [], []
    for sampled in sample_frames(path, fps=fps):
        frames.append(sampled.image)
        stamps.append(sampled.timestamp)
        if len(frames) >= min(size, max(1, WINDOW_BYTES // sampled.image.nbytes)):
            yield np.stack(frames), stamps
            frames, stamps = [], []
    if frames:
        yield np.stack(frames), stamps


@dataclass
class _Decoded:
    """One step of the decoder's output: a window of a clip's frames, the clip's end, or its failure."""

    entry: ClipEntry
    info: VideoInfo | None = None
    frames: np.ndarray | None = None
    stamps: list[float] | None = None
    error: Exception | None = None


def _decoded(entries: list[ClipEntry], fps: float, size: int) -> Iterator[_Decoded]:
    """Every clip's windows of sampled frames, then an end mark (info, no frames), or its error
    (after the windows decoded before it)."""
    for entry in entries:
        try:
            info = probe(entry.path)
            windows = 0
            for frames, stamps in _windows(entry.path, fps, size):
                windows += 1
                yield _Decoded(entry, info, frames, stamps)
            if not windows:
                raise VideoError(f"{entry.path}: no frames could be decoded")
        except Exception as exc:  # whatever this clip's file does, only this clip fails
            yield _Decoded(entry, error=exc)
            continue
        yield _Decoded(entry, info)


def embed_clips(
    entries: list[ClipEntry], networks: Networks, settings: ExtractSettings
) -> Iterator[ClipFeatures | Failure]:
    """Decode, detect and embed clips; yields each clip's features, or its failure, in manifest order.

    Decoding runs DECODE_AHEAD windows ahead in a thread, overlapping the networks. An error
    in one clip (decoding, detection and crops, the CNN call its frames are part of, the
    choice of its main face and the assembly of its arrays) is that clip's Failure, and the
    other clips go on.
    """
    embedder = Embedder(networks, settings.batch_size, keep_crops=settings.save_crops, detect_every=settings.detect_every)
    in_flight: deque[ClipInProgress] = deque()
    clip = None
    for step in ahead(_decoded(entries, settings.fps, settings.batch_size), DECODE_AHEAD):
        if clip is None:
            clip = ClipInProgress(tag=(step.entry, step.info))
        if step.frames is not None:
            embedder.add_window(clip, step.frames, step.stamps)
            continue
        if step.error is not None:
            embedder.fail(clip, "decode", step.error)
        clip.all_windows_added = True
        in_flight.append(clip)
        clip = None
        yield from map(_result, finished(in_flight))
    embedder.flush()
    yield from map(_result, finished(in_flight))


def _result(clip: ClipInProgress) -> ClipFeatures | Failure:
    """A finished clip's features, with its main face chosen, or its failure."""
    entry, info = clip.tag
    if clip.failed is None:
        try:
            return ClipFeatures(
                clip_id=entry.clip_id,
                label=entry.label or "",
                source_path=str(entry.path),
                source_fps=info.fps,
                duration=info.duration,
                **clip.assemble(),
            )
        except Exception as exc:  # this clip's detections or features: only this clip fails
            clip.failed = StageError("assemble", exc)
    return clip_failure(entry.clip_id, entry.path, clip.failed)


def clip_failure(clip_id: str, path: Path, failed: StageError) -> Failure:
    """The failure of one clip, logged with its traceback (shown with -v). A VideoError names the
    file and the problem already; other errors say their type too."""
    exc = failed.exception
    error = one_line(str(exc) if isinstance(exc, VideoError) else f"{type(exc).__name__}: {exc}")
    logger.info("%s: failed at stage %s: %s", clip_id, failed.stage, error, exc_info=exc)
    return Failure(clip_id, str(path), failed.stage, error, file_stamp(path))


def _shard_numbers(folder: Path) -> list[int]:
    return sorted(number for p in shard_files(folder) if (number := shard_number(p.name)) is not None)


def _check_same_settings(folder: Path, attrs: dict, context_dtype: str, store_face_crops: bool) -> set[str]:
    """Clip ids already extracted in `folder`, after checking they were made the same way."""
    if not _shard_numbers(folder):
        return set()
    with open_features(folder) as existing:
        differences = comparable(existing.attrs, shard_attrs(attrs, context_dtype, store_face_crops))
        if differences:
            raise ExtractError(
                f"{folder} holds features made with other settings ({'; '.join(differences)}):"
                " use another --out, or delete that folder to start over"
            )
        return set(existing.clip_ids)


_NETWORKS: dict[tuple, Networks] = {}
# A Dask worker runs one task per thread: they share its networks, loaded once.
_NETWORKS_LOCK = threading.Lock()


def _networks_for(settings: ExtractSettings) -> Networks:
    """Loaded once per process (each joblib or Dask worker keeps its own)."""
    key = (settings.detector_backbone, settings.detector_threshold, settings.context_backbone, settings.device,
           settings.precision)
    with _NETWORKS_LOCK:
        if key not in _NETWORKS:
            _NETWORKS[key] = load_networks(settings)
            logger.info("networks loaded on %s: RetinaFace %s, face CNN %s, context CNN %s",
                        _NETWORKS[key].face_cnn.device, settings.detector_backbone, face_cnn.WEIGHT_NAME,
                        _NETWORKS[key].context_cnn.weights_label)
        return _NETWORKS[key]


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
        for result in embed_clips(entries, _networks_for(settings), settings):
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
                logger.info("%s: %d frames sampled, a face in %d", result.clip_id, len(result.timestamps),
                            result.has_face.sum())
            report()
        if writer is not None and not writer.n_clips:
            raise _NoClipStored
    report()
    logger.info("%s: %d clips, %d frames, %d failed, in %.1f s (process %d, torch threads %d)",
                shard.name if summary.done else "(no shard)", summary.done, summary.frames, len(summary.failures),
                time.monotonic() - started, os.getpid(), torch.get_num_threads())
    return summary


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


def _this_part(entries: list[ClipEntry], settings: ExtractSettings, progress: bool) -> list[ClipEntry]:
    """The clips of this run's part, in manifest order; all of them when the run is not sharded."""
    if settings.num_shards is None:
        return entries
    part = set(balanced_parts(clip_durations(entries, progress), settings.num_shards)[settings.shard_index])
    return [e for e in entries if e.clip_id in part]


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
    part = _this_part(entries, settings, progress)
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
    attrs = feature_attrs(settings)
    with only_writer(folder):
        done_ids = _check_same_settings(folder, attrs, settings.context_dtype, settings.save_crops)
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
