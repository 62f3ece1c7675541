"""Stage 2: does data loading starve training? One epoch preloaded vs read from gzip or uncompressed shards.

    python benchmarks/train_benchmark.py                                # 512 clips, 25088-d context
    python benchmarks/train_benchmark.py --context-dim 1280 --model face

Feature files are written through `features/` with the real schema (float16 context, gzip),
clips of 4-12 frames, then copied uncompressed with `features repack`. Each way of reading
runs `--repeats` epochs, interleaved so that another process's load hits all of them alike;
the fastest is shown, split into waiting for data and compute, with its cost against the
preloaded epoch and the part of it that is waiting for data. Compare ratios within one
run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.reader import open_features, write_index  # noqa: E402
from features.writer import ShardWriter  # noqa: E402
from features.schema import shard_name  # noqa: E402
from features.tools import repack  # noqa: E402
from tests.feature_files import extractor_attrs, planted_clip  # noqa: E402
from train.data import ClipDataset, make_loader  # noqa: E402
from train.evaluation import predict  # noqa: E402
from train.loop import MixedPrecision, _train_epoch  # noqa: E402
from train.models import build_model  # noqa: E402
from train.packed import CACHE_ENV, preloaded  # noqa: E402


def write_features(folder: Path, clips: int, context_dim: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with ShardWriter(folder / shard_name(0), extractor_attrs(context_dim=context_dim)) as writer:
        for i in range(clips):
            clip = planted_clip(f"c{i:05d}", i % 8, rng.normal(0, 1, 128), np.zeros(context_dim), rng, context_dim)
            writer.add_clip(clip)
    write_index(folder)


def epoch(model_name: str, folder: Path, preload: bool, workers: int, batch_size: int) -> tuple[float, float, float]:
    """(total seconds, seconds waiting for data, evaluation seconds) for one epoch."""
    torch.manual_seed(0)
    with open_features(folder) as features:
        classes = list(features.attrs["classes"])
        model = build_model(model_name, int(features.attrs["context_dim"]), len(classes))
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
        # The steps cache is made by the warm-up epoch and mapped by every later one.
        steps = preloaded(features, "always", model.inputs, "train", log=lambda line: None) if preload else None
        train = ClipDataset(features, classes, train=True, inputs=model.inputs, steps=steps)
        loader = make_loader(train, batch_size, workers, 0, shuffle=True)
        start = time.perf_counter()
        with tqdm(total=len(loader), disable=True) as bar:
            _, waiting = _train_epoch(model, loader, optimiser, torch.nn.CrossEntropyLoss(), torch.device("cpu"), bar,
                                      MixedPrecision(torch.device("cpu"), "float32"))
        total = time.perf_counter() - start
        evaluation = ClipDataset(features, classes, train=False, inputs=model.inputs, steps=steps)
        start = time.perf_counter()
        predict(model, make_loader(evaluation, 64, workers, 0, False), torch.device("cpu"))
        return total, waiting, time.perf_counter() - start


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.h5")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--context-dim", type=int, default=25088)
    parser.add_argument("--model", default="caca")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers when reading from shards.")
    parser.add_argument("--repeats", type=int, default=3, help="Epochs per way of reading; the fastest is shown.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[CACHE_ENV] = str(Path(tmp) / "steps")
        gzip_folder, none_folder = Path(tmp) / "gzip", Path(tmp) / "none"
        write_features(gzip_folder, args.clips, args.context_dim)
        repack(gzip_folder, none_folder, "none")
        print(f"{args.clips} clips, context {args.context_dim}-d float16 ({megabytes(gzip_folder):.0f} MB gzip,"
              f" {megabytes(none_folder):.0f} MB uncompressed), model {args.model}, batch {args.batch_size},"
              f" {args.workers} loader workers, torch {torch.get_num_threads()} threads, best of {args.repeats}")
        ways = {
            "preloaded": (gzip_folder, True, 0),
            "gzip shards": (gzip_folder, False, args.workers),
            "uncompressed shards": (none_folder, False, args.workers),
        }
        epoch(args.model, gzip_folder, preload=True, workers=0, batch_size=args.batch_size)  # warm-up (allocator, caches)
        runs = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, (folder, preload, workers) in ways.items():
                runs[name].append(epoch(args.model, folder, preload, workers, args.batch_size))
        best = {name: min(times) for name, times in runs.items()}
        preloaded_total, preloaded_waiting, _ = best["preloaded"]
        for name, (total, waiting, evaluation) in best.items():
            # Compute varies by 10% or more between epochs however the data comes; the extra
            # waiting for data is the steadier measure of what reading costs.
            print(f"  {name:<20} epoch {total:5.2f} s (data {waiting:4.2f} s, compute {total - waiting:4.2f} s),"
                  f" {total / preloaded_total - 1:+4.0%} against preloaded,"
                  f" of which data {(waiting - preloaded_waiting) / preloaded_total:+4.0%};"
                  f" train {args.clips / total:5.0f} clips/s, evaluate {args.clips / evaluation:5.0f} clips/s")


if __name__ == "__main__":
    main()
