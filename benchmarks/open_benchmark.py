"""What the first look costs (issue 22): opening a set of many shards, each shard parsed first in the look's helper
process (`features/look.py`), against parsing them in the command's own process as before.

    .venv/bin/python benchmarks/open_benchmark.py --folder /tmp/open-benchmark          # 100 shards of 64 clips
    .venv/bin/python benchmarks/open_benchmark.py --folder /tmp/open-small --shards 5 --rounds 3

The set (written once, then reused): `--shards` gzip shards of `--clips` planted clips each
(4-12 frames, 1280-d float16 context, as MobileNetV2's), with its index. Every open is a
command's first: a fresh process, the page cache warm (one untimed open first), the time of
`open_features` alone (the interpreter and its imports are every command's, either way),
which with the look includes starting its helper. The two ways alternate, `--rounds` times
each; medians (min-max) are printed, with and without the index, then the second open in the
same process (the shards this process has looked at are not looked at again). Target: at most
1 s more than parsing in-process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from features.reader import write_index  # noqa: E402
from features.schema import INDEX_NAME, shard_name  # noqa: E402
from features.writer import ShardWriter  # noqa: E402
from tests.feature_files import extractor_attrs, planted_clip  # noqa: E402

CONTEXT_DIM = 1280
TARGET_SECONDS = 1.0
SET_FILE = "open-benchmark.json"
WAYS = ("in-process", "look")

# The child: one open of the set, timed, the look's helper replaced by the in-process check for "in-process".
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from features import reader
if sys.argv[3] == "in-process":
    reader.looked_shard = reader.examine_shard
started = time.perf_counter()
with reader.open_features(sys.argv[2]) as features:
    first = time.perf_counter() - started
started = time.perf_counter()
with reader.open_features(sys.argv[2]) as features:
    again = time.perf_counter() - started
print(json.dumps({"first": first, "again": again, "clips": len(features)}))
"""


def ensure_set(folder: Path, shards: int, clips: int) -> None:
    description = {"shards": shards, "clips": clips, "context_dim": CONTEXT_DIM}
    marker = folder / SET_FILE
    if marker.is_file() and json.loads(marker.read_text()) == description:
        return
    if folder.exists() and any(folder.iterdir()):
        sys.exit(f"{folder} holds something other than this benchmark's set: name another --folder")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for number in range(shards):
        with ShardWriter(folder / shard_name(number), extractor_attrs(context_dim=CONTEXT_DIM)) as writer:
            for i in range(clips):
                code = np.zeros(CONTEXT_DIM)
                writer.add_clip(planted_clip(f"{number:03d}/{i:03d}", i % 4, np.zeros(128), code, rng, CONTEXT_DIM))
    write_index(folder)
    marker.write_text(json.dumps(description))


def open_once(folder: Path, way: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(folder), way], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def measure(folder: Path, rounds: int) -> dict[str, list[dict]]:
    open_once(folder, "look")  # the page cache warm
    figures = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            figures[way].append(open_once(folder, way))
    return figures


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms ({min(values) * 1000:.0f}-{max(values) * 1000:.0f})"


def report(figures: dict[str, list[dict]], what: str) -> float:
    """Prints one line per way; returns the look's extra median seconds."""
    for way in WAYS:
        print(f"  {what}, {way:<10}: first open {spread([f['first'] for f in figures[way]])},"
              f" second open {spread([f['again'] for f in figures[way]])}")
    extra = statistics.median(f["first"] for f in figures["look"]) - statistics.median(
        f["first"] for f in figures["in-process"])
    print(f"  {what}: the look adds {extra * 1000:.0f} ms to a command's first open (target <= {TARGET_SECONDS:.0f} s):"
          f" {'met' if extra <= TARGET_SECONDS else 'NOT met'}")
    return extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="where the set is written once, then reused")
    parser.add_argument("--shards", type=int, default=100)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ensure_set(args.folder, args.shards, args.clips)
    size = sum(path.stat().st_size for path in args.folder.glob("*.h5"))
    print(f"{args.shards} shards of {args.clips} clips, {size / 1e6:.0f} MB; medians (min-max) of {args.rounds}"
          f" fresh processes, alternating", flush=True)
    report(measure(args.folder, args.rounds), "with its index")
    index = args.folder / INDEX_NAME
    kept = index.read_bytes()
    index.unlink()
    try:
        report(measure(args.folder, args.rounds), "without an index")
    finally:
        index.write_bytes(kept)


if __name__ == "__main__":
    main()
