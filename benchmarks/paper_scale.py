"""Stage 2 at the paper's scale: epoch, data wait, start-up and peak memory per model on a CHEAVD-shaped set.

    python benchmarks/paper_scale.py --features /tmp/cheavd-shaped          # every model, CPU
    python benchmarks/paper_scale.py --features /tmp/cheavd-shaped --models caca,face --device cuda
    python benchmarks/paper_scale.py --features /tmp/small --scale 0.02 --epochs 2   # the quick CPU check

The set (written once through `features.ShardWriter`, then reused): CHEAVD 2.0's split sizes
(4,917 train and 707 val clips, times `--scale`), clips of 1 + a log-normal number of seconds
(median 2.7 s, mean 3.3 s, 77% at most 4 s, capped at 19 s) at 5 fps, 10% of frames without a
face, SqueezeNet-sized 25088-d context (non-negative like pooled ReLU maps, half zeros) stored as
float16, a voice of `extract`'s default size (128-d log-mel statistics) with 5% of frames without
audio, in gzip shards of 64 clips, as `extract` writes them. Labels are drawn with LABEL_SHARES.

Each model trains in a fresh process through `train.loop.train_model` itself (the paper's
settings: Adam, lr 1e-4, batch 32; preloaded; `--precision`), for `--epochs` epochs; the epoch
shown is the fastest one in its epochs.csv (train + val, with its waiting for data in both).
Before training, the process makes the steps cache of the model's inputs in a new folder
("cache made": what a first run on the shards pays once); start-up is then the rest of the
training call (mapping the cache, building the model, writing the checkpoints), what every later
run pays. Peak memory is the process's peak RSS (and on a GPU torch's peak allocation). The
encoder floor is timed in the same run, in its own process. Last, `compare --jobs 2` training two
seeds of `--jobs-model` at once is set against one `train` of it: the peak proportional set size
of each command's process tree (pages the jobs share, the mapped cache, count once).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devices import PRECISIONS  # noqa: E402
from extract.settings import DEFAULT_FPS, ExtractSettings  # noqa: E402
from features.labels import CHEAVD_CLASSES  # noqa: E402
from features.reader import open_features, write_index  # noqa: E402
from features.schema import FACE_DIM, ClipFeatures, shard_name  # noqa: E402
from features.writer import ShardWriter  # noqa: E402
from tests.feature_files import HEARING, clip_of, extractor_attrs, with_voice  # noqa: E402
from train.config import PAPER_SEEDS, MODEL_NAMES, TRAINABLE_MODELS, TrainConfig, parse_models  # noqa: E402
from train.models import PAPER_CONTEXT_DIM  # noqa: E402

SPLITS = {"train": 4917, "val": 707}  # CHEAVD 2.0 (MEC 2017)
MIN_SECONDS, MAX_SECONDS = 1.0, 19.0
# Seconds beyond the first: log-normal, mean 2.3 s, so clips average 3.3 s and most last 1-4 s.
EXTRA_SECONDS_LOG_MEAN, EXTRA_SECONDS_LOG_SD = 0.552, 0.75
FACELESS_SHARE = 0.1
SILENT_SHARE = 0.05  # frames no audio covers (a track ending early, or starting late)
# CHEAVD 2.0's published class counts were not at hand: an assumed skew of the same kind
# (neutral most, then happy and angry; surprise and disgust rarest), by CHEAVD_CLASSES order.
LABEL_SHARES = {"happy": 0.20, "sad": 0.11, "angry": 0.14, "surprise": 0.05, "disgust": 0.05,
                "worried": 0.08, "anxious": 0.07, "neutral": 0.30}
SHARD_CLIPS = ExtractSettings.shard_size
SET_FILE = "paper_scale.json"  # written last: the folder holds the complete set it describes

# The Table I protocol: the six RNNs, 5 seeds, 30 epochs each (train.config's defaults).
PROTOCOL_SEEDS = PAPER_SEEDS
PROTOCOL_EPOCHS = TrainConfig.epochs
# The targets.
FLOOR_MULTIPLE_TARGET = 4.0
PROTOCOL_HOURS_TARGET = 3.0
DATA_SHARE_TARGET = 0.05
JOBS_MEMORY_TARGET = 1.3
FLOOR_MODEL = "caca"


def clip_counts(scale: float) -> dict[str, int]:
    return {split: max(1, round(count * scale)) for split, count in SPLITS.items()}


def clip_frames(rng: np.random.Generator) -> int:
    seconds = MIN_SECONDS + rng.lognormal(EXTRA_SECONDS_LOG_MEAN, EXTRA_SECONDS_LOG_SD)
    return max(1, round(min(seconds, MAX_SECONDS) * DEFAULT_FPS))


def cheavd_clip(clip_id: str, label: str, rng: np.random.Generator) -> ClipFeatures:
    frames = clip_frames(rng)
    has_face = rng.random(frames) >= FACELESS_SHARE
    has_face[0] = True
    face = rng.standard_normal((frames, FACE_DIM), np.float32)
    context = np.maximum(rng.standard_normal((frames, PAPER_CONTEXT_DIM), np.float32), 0).astype(np.float16)
    audio = rng.standard_normal((frames, HEARING["audio_dim"]), np.float32)
    return with_voice(clip_of(clip_id, label, has_face, face, context), audio, rng.random(frames) >= SILENT_SHARE)


def write_split(folder: Path, split: str, count: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    labels = rng.choice(CHEAVD_CLASSES, size=count, p=[LABEL_SHARES[name] for name in CHEAVD_CLASSES])
    attrs = extractor_attrs(split=split, context_dim=PAPER_CONTEXT_DIM, **HEARING)
    for first in range(0, count, SHARD_CLIPS):
        with ShardWriter(folder / shard_name(first // SHARD_CLIPS), attrs) as writer:
            for i in range(first, min(first + SHARD_CLIPS, count)):
                writer.add_clip(cheavd_clip(f"{split}/{i:05d}", str(labels[i]), rng))
    write_index(folder)


def ensure_set(root: Path, scale: float) -> dict:
    """The set's description; the set is written unless `root` already holds it. A folder holding
    anything else is refused, never overwritten."""
    description = {"splits": clip_counts(scale), "scale": scale, "context_dim": PAPER_CONTEXT_DIM,
                   "audio_dim": HEARING["audio_dim"], "seed": 0}
    marker = root / SET_FILE
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return description
    if root.exists() and any(root.iterdir()):
        sys.exit(f"{root} holds something other than this benchmark's set (scale {scale}): name another --features")
    rng = np.random.default_rng(description["seed"])
    started = time.perf_counter()
    for split, count in description["splits"].items():
        write_split(root / split, split, count, rng)
    marker.write_text(json.dumps(description))
    print(f"wrote the set in {time.perf_counter() - started:.0f} s")
    return description


def shard_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.glob("*/*.h5"))


def read_once_seconds(root: Path, inputs: tuple[str, ...]) -> float:
    """Seconds to read (and decompress) the arrays `inputs` and has_face of every shard once, whole."""
    import h5py

    started = time.perf_counter()
    for path in sorted(root.glob("*/*.h5")):
        with h5py.File(path, "r") as handle:
            for name in ("has_face", *inputs):
                handle["frames"][name][...]
    return time.perf_counter() - started


@dataclass
class ModelFigures:
    model: str
    epoch: float  # seconds, train + val, the fastest epoch
    data: float  # seconds of that epoch (train and val) spent waiting for data
    startup: float  # seconds of the training call outside its epochs, the steps cache made already
    read_once: float  # seconds to read the model's arrays from the shards once
    peak_rss: float  # bytes
    peak_gpu: float | None  # bytes
    cache_made: float  # seconds to make the steps cache of the model's inputs (train and val) from nothing


def peak_rss_bytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def cached_steps_of(root: Path, inputs: tuple[str, ...], cache: Path) -> float:
    """Seconds to make (or find) the steps cache of `inputs` for both splits in `cache`."""
    from train.packed import cached_steps

    started = time.perf_counter()
    for split in SPLITS:
        with open_features(root / split) as features:
            cached_steps(features, inputs, cache)
    return time.perf_counter() - started


def measure_model(model: str, root: str, epochs: int, device: str | None,
                  precision: str = TrainConfig.precision) -> ModelFigures:
    """Make the model's steps cache in a new folder, then train `model` through `train_model` in
    this (fresh) process and read its epochs.csv."""
    import csv

    import torch

    from train.layout import EPOCHS_FILE
    from train.loop import train_model
    from train.packed import CACHE_ENV

    inputs = build_inputs(model)
    with tempfile.TemporaryDirectory() as runs:
        os.environ[CACHE_ENV] = str(Path(runs) / "steps")
        cache_made = cached_steps_of(Path(root), inputs, Path(runs) / "steps")
        config = TrainConfig(model=model, features=Path(root), out=Path(runs) / model, epochs=epochs,
                             device=device, preload="always", precision=precision)
        started = time.perf_counter()
        train_model(config, progress=False, log=lambda _: None)
        wall = time.perf_counter() - started
        with open(config.run_folder / EPOCHS_FILE, newline="") as file:
            rows = [(float(row["seconds"]), float(row["data_seconds"])) for row in csv.DictReader(file)]
    epoch, data = min(rows)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and device != "cpu" else None
    return ModelFigures(model, epoch, data, wall - sum(seconds for seconds, _ in rows),
                        read_once_seconds(Path(root), inputs), peak_rss_bytes(), gpu, cache_made)


def build_inputs(model: str) -> tuple[str, ...]:
    from train.models import build_model

    return build_model(model, PAPER_CONTEXT_DIM, len(CHEAVD_CLASSES)).inputs


def encoder_floor(root: str, device: str | None) -> float:
    """Seconds for a float32 forward and backward of caca's context encoder over every train frame,
    in batches of a batch's worth of clips' frames, plus its forward over every val frame."""
    import torch

    from devices import resolve_device
    from train.models import build_model

    target = resolve_device(device)
    encoder = build_model(FLOOR_MODEL, PAPER_CONTEXT_DIM, len(CHEAVD_CLASSES)).encoders["context"].to(target)
    splits = {}
    for split in SPLITS:
        with open_features(Path(root) / split) as features:
            splits[split] = (features.n_frames, len(features))
    frames_per_batch = round(TrainConfig.batch_size * splits["train"][0] / splits["train"][1])
    batch = torch.rand(frames_per_batch, PAPER_CONTEXT_DIM, device=target)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=TrainConfig.lr)
    started = time.perf_counter()
    for first in range(0, splits["train"][0], frames_per_batch):
        rows = batch[: min(frames_per_batch, splits["train"][0] - first)]
        optimiser.zero_grad(set_to_none=True)
        encoder(rows).sum().backward()
        optimiser.step()
    with torch.inference_mode():
        for first in range(0, splits["val"][0], frames_per_batch):
            encoder(batch[: min(frames_per_batch, splits["val"][0] - first)])
    if target.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def parent_pids() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path("/proc", entry, "stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat:
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def tree_pss_bytes(root_pid: int) -> int:
    """The proportional set size of a process and all its descendants: pages shared between them
    (a memory-mapped steps cache) count once in total, not once per process as RSS counts them."""
    parents = parent_pids()
    tree, grown = {root_pid}, True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grown = bool(children)
    total = 0
    for pid in tree:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")) * 1024
    return total


def peak_memory_of(command: list[str], env: dict) -> float:
    """Run `command`; the peak, sampled every 0.2 s, of its process tree's proportional set size."""
    import subprocess

    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_pss_bytes(process.pid))
            time.sleep(0.2)
        if process.returncode != 0:
            errors.seek(0)
            sys.exit(f"{' '.join(command)} failed: {errors.read().strip().splitlines()[-1:]}")
    return peak


def jobs_memory(root: Path, device: str | None, model: str) -> tuple[float, float]:
    """Peak memory (proportional set size of the whole process tree) of one `train` of `model` and of
    `compare --jobs 2` training two seeds of it at once, one epoch each, the steps cache made first."""
    from train.packed import CACHE_ENV

    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, **{CACHE_ENV: str(Path(work) / "steps")})
        cached_steps_of(root, build_inputs(model), Path(work) / "steps")
        common = ["--features", str(root), "--epochs", "1", "--preload", "always"]
        common += ["--device", device] if device else []
        cli = [sys.executable, str(ROOT / "cli.py")]
        train = [*cli, "train", "--model", model, *common]
        one = peak_memory_of([*train, "--out", str(Path(work) / "one")], env)
        two = peak_memory_of([*cli, "compare", "--models", model, "--seeds", "2", "--jobs", "2", *common,
                              "--out", str(Path(work) / "two")], env)
    return one, two


def print_jobs_memory(model: str, one: float, two: float) -> None:
    print(f"  memory of `compare --jobs 2` ({model}, two seeds at once) against one `train` of it (peak"
          f" proportional set size of the process tree): {two / 1e9:.2f} GB vs {one / 1e9:.2f} GB, {two / one:.2f}x"
          f" (target <= {JOBS_MEMORY_TARGET}x): {verdict(two <= JOBS_MEMORY_TARGET * one)}")


def in_fresh_process(function, *args):
    """`function(*args)` in a new process (spawned, so no memory is inherited from this one)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_floor(floor: float, when: str) -> None:
    print(f"encoder floor ({FLOOR_MODEL}'s 25088->128 context encoder, float32), {when}: {floor:.2f} s", flush=True)


def print_header() -> None:
    print(f"{'model':<9}{'epoch':>9}{'data':>16}{'cache made':>12}{'start-up':>10}{'read once':>11}{'peak RSS':>10}"
          f"{'peak GPU':>10}")


def print_row(f: ModelFigures) -> None:
    """One model's figures, printed as soon as it is measured, so a run cut short keeps them."""
    gpu = f"{f.peak_gpu / 1e9:.1f} GB" if f.peak_gpu is not None else "-"
    print(f"{f.model:<9}{f.epoch:>7.1f} s{f.data:>7.2f} s ({f.data / f.epoch:4.0%}){f.cache_made:>10.1f} s"
          f"{f.startup:>8.1f} s{f.read_once:>9.1f} s{f.peak_rss / 1e9:>7.1f} GB{gpu:>10}", flush=True)


def print_targets(figures: list[ModelFigures], floor: float) -> None:
    print("against the issue's targets:")
    for f in figures:
        first = f.cache_made + f.startup
        print(f"  {f.model}: waiting for data {f.data / f.epoch:.1%} of the epoch (target <= {DATA_SHARE_TARGET:.0%}):"
              f" {verdict(f.data <= DATA_SHARE_TARGET * f.epoch)}; start-up vs one read of its shards"
              f" ({f.read_once:.1f} s; target <= 1x): first run, making the steps cache, {first:.1f} s"
              f" ({first / f.read_once:.1f}x): {verdict(first <= f.read_once)}; later runs, mapping it,"
              f" {f.startup:.1f} s ({f.startup / f.read_once:.2f}x): {verdict(f.startup <= f.read_once)}")
    by_model = {f.model: f for f in figures}
    if FLOOR_MODEL in by_model:
        multiple = by_model[FLOOR_MODEL].epoch / floor
        print(f"  {FLOOR_MODEL} epoch = {multiple:.1f}x the encoder floor (target <= {FLOOR_MULTIPLE_TARGET:.0f}x):"
              f" {verdict(multiple <= FLOOR_MULTIPLE_TARGET)}")
    rnns = [by_model[name] for name in MODEL_NAMES if name in by_model]
    if len(rnns) == len(MODEL_NAMES):
        # The steps cache is made once (by the first model of each set of inputs), then mapped.
        seconds = max(f.cache_made for f in rnns) + PROTOCOL_SEEDS * sum(f.startup + PROTOCOL_EPOCHS * f.epoch
                                                                          for f in rnns)
        hours = seconds / 3600
        print(f"  Table I protocol ({len(MODEL_NAMES)} RNNs x {PROTOCOL_SEEDS} seeds x {PROTOCOL_EPOCHS} epochs,"
              f" plus start-ups), one job at a time: {hours:.1f} h (target <= {PROTOCOL_HOURS_TARGET:.0f} h):"
              f" {verdict(hours <= PROTOCOL_HOURS_TARGET)}")
    else:
        print(f"  Table I protocol: not projected (it needs all of {', '.join(MODEL_NAMES)} in --models)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, required=True,
                        help="Folder of the set: written if new or empty, reused if it holds the same set.")
    parser.add_argument("--models", default=",".join(TRAINABLE_MODELS),
                        help="Comma-separated models to time (default: every one, those that hear included).")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present).")
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of CHEAVD 2.0's clip counts.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per model; the fastest is shown.")
    parser.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                        help="Training precision (train --precision).")
    parser.add_argument("--jobs-model", default=FLOOR_MODEL, choices=TRAINABLE_MODELS,
                        help="The model whose memory is measured for `compare --jobs 2` against one job.")
    args = parser.parse_args()
    try:
        models = parse_models(args.models)
    except ValueError as exc:
        parser.error(str(exc))
    import torch

    description = ensure_set(args.features, args.scale)
    counts = description["splits"]
    frames = {}
    for split in counts:
        with open_features(args.features / split) as features:
            frames[split] = features.n_frames
    print(f"{counts['train']} train and {counts['val']} val clips ({frames['train'] / counts['train'] / DEFAULT_FPS:.1f} s"
          f" a clip on average), {frames['train'] + frames['val']} frames, context {PAPER_CONTEXT_DIM}-d float16,"
          f" {shard_bytes(args.features) / 1e9:.2f} GB of gzip shards in {args.features}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device or 'default'};"
          f" batch {TrainConfig.batch_size}, lr {TrainConfig.lr}, Adam, preloaded; fastest of {args.epochs} epochs;"
          " each model in its own process")
    floor = in_fresh_process(encoder_floor, str(args.features), args.device)
    print_floor(floor, "before the models")
    print_header()
    figures = []
    for model in models:
        figures.append(in_fresh_process(measure_model, model, str(args.features), args.epochs, args.device,
                                        args.precision))
        print_row(figures[-1])
    # Timed again at the end: a job sharing the machine shows as a difference between the two.
    print_floor(in_fresh_process(encoder_floor, str(args.features), args.device), "after them")
    print_targets(figures, floor)
    print_jobs_memory(args.jobs_model, *jobs_memory(args.features, args.device, args.jobs_model))


if __name__ == "__main__":
    main()
