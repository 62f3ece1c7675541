"""`extract --detect-every K`: what detecting every K-th sampled frame and tracking between saves,
and how far its boxes and face features are from detecting every frame (K=1, the paper's).

    python benchmarks/detect_every_benchmark.py                  # 3 scenes x 3 kinds of clip, 10 s
    python benchmarks/detect_every_benchmark.py --seconds 20 --every 1 2 3 5 8
    python benchmarks/detect_every_benchmark.py --every 1 3 --track-region 2.0 160   # other squares

Clips are real photographs (scikit-image, matplotlib) at 640x360, H.264 25 fps, sampled at
5 fps, on three real scenes: `moving` is extract_benchmark's clip (a face crossing the frame
at 15 px a sample, jumping back to the left every 6 s), `fast` a face at 60 px a sample
bouncing between the edges, `two faces` a second, smaller face crossing the other way. The
detector is the real one, wrapped to count the frames and pixels it is given. Each K runs
the whole extraction (embed_clips); figures are printed, never asserted.

Agreement with K=1: mean IoU of the main-face boxes on tracked frames (not keyframes) where
both have a face, the fraction of frames whose has_face differs, and the mean cosine
similarity of the 128-d face features where both have a face. For comparison, the same IoU
for two trackers that need no detector between keyframes, computed from K=1's own main-face
boxes on keyframes: holding the last keyframe's box, and interpolating linearly to the next
keyframe (which needs frames after the window, so does not fit the streaming extractor).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.extract_benchmark import SCENES, SIZE, make_clip, scene_frame  # noqa: E402
from demo.sample_set import FACES  # noqa: E402
from extract import faces  # noqa: E402
from extract.clips import embed_clips, load_networks, recipe_of  # noqa: E402
from extract.settings import DEFAULT_BATCH_SIZE, ExtractSettings, NetworkChoice  # noqa: E402
from features.recipe import FeatureRecipe  # noqa: E402
from features.failures import Failure  # noqa: E402
from manifests.manifest import ClipEntry  # noqa: E402
from tests.media import HEAD, photo, write_clip  # noqa: E402

KINDS = ("moving", "fast", "two faces")
HEAD_SIDE = 160
SECOND_HEAD_SIDE = 120
FAST_PX_PER_FRAME = 12


class CountingDetector:
    """The real detector, counting the calls, frames and pixels it is given and the time it takes."""

    def __init__(self, detector):
        self.detector = detector
        self.calls = self.frames = self.pixels = 0
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def detect(self, frames):
        self.calls += 1
        self.frames += len(frames)
        self.pixels += int(np.prod(frames.shape[:3]))
        start = time.perf_counter()
        found = self.detector.detect(frames)
        self.seconds += time.perf_counter() - start
        return found


def bounce(i: int, speed: int, span: int) -> int:
    """Position after i frames at `speed` px a frame, going back and forth over [0, span]."""
    x = (i * speed) % (2 * span)
    return x if x <= span else 2 * span - x


def second_head() -> np.ndarray:
    left, top, side = FACES["grace_hopper"].head
    image = FACES["grace_hopper"].photo.load().crop((left, top, left + side, top + side))
    return np.asarray(image.resize((SECOND_HEAD_SIDE, SECOND_HEAD_SIDE)))


def make_kind(path: Path, kind: str, scene: str, seconds: float) -> Path:
    if kind == "moving":
        return make_clip(path, scene, seconds)
    background = scene_frame(scene)
    head = torch.nn.functional.interpolate(
        torch.from_numpy(photo("astronaut")[HEAD]).permute(2, 0, 1)[None].float(), size=(HEAD_SIDE, HEAD_SIDE),
        mode="bilinear", antialias=True,
    )[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    other = second_head()
    frames = []
    for i in range(int(seconds * 25)):
        frame = background.copy()
        if kind == "fast":
            x = bounce(i, FAST_PX_PER_FRAME, SIZE[1] - HEAD_SIDE)
            frame[100 : 100 + HEAD_SIDE, x : x + HEAD_SIDE] = head
        else:
            x = bounce(i, 3, SIZE[1] - HEAD_SIDE)
            frame[20 : 20 + HEAD_SIDE, x : x + HEAD_SIDE] = head
            x2 = SIZE[1] - SECOND_HEAD_SIDE - bounce(i, 2, SIZE[1] - SECOND_HEAD_SIDE)
            frame[220 : 220 + SECOND_HEAD_SIDE, x2 : x2 + SECOND_HEAD_SIDE] = other
        frames.append(frame)
    return write_clip(path, frames)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4) boxes."""
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def from_keyframes(box: np.ndarray, has_face: np.ndarray, every: int, interpolate: bool) -> np.ndarray:
    """Boxes a detector-free tracker gives between keyframes (NaN where it has none)."""
    out = np.full_like(box, np.nan)
    count = len(box)
    for t in range(count):
        before = t - t % every
        after = before + every
        if not has_face[before]:
            continue
        if t == before or not interpolate:
            out[t] = box[before]
        elif after < count and has_face[after]:
            w = (t - before) / every
            out[t] = (1 - w) * box[before] + w * box[after]
    return out


def agreement(reference: list, result: list, every: int) -> dict[str, float]:
    """Pooled over clips: the tracker's IoU, has_face and cosine agreement with K=1, and the alternatives'."""
    ious, holds, lerps, cosines, differ, frames = [], [], [], [], 0, 0
    for ref, got in zip(reference, result):
        tracked = np.arange(len(ref.has_face)) % every != 0
        both = ref.has_face & got.has_face
        ious.append(iou(ref.box[both & tracked], got.box[both & tracked]))
        cosines.append(cosine(ref.face[both], got.face[both]))
        differ += int((ref.has_face != got.has_face).sum())
        frames += len(ref.has_face)
        for interpolate, into in ((False, holds), (True, lerps)):
            alt = from_keyframes(ref.box, ref.has_face, every, interpolate)
            shown = ref.has_face & ~np.isnan(alt[:, 0]) & tracked
            into.append(iou(ref.box[shown], alt[shown]))
    mean = lambda parts: float(np.concatenate(parts).mean()) if sum(map(len, parts)) else float("nan")  # noqa: E731
    return {"iou": mean(ious), "differ": differ / frames, "cosine": mean(cosines), "hold": mean(holds),
            "interpolate": mean(lerps)}


def extracted(clips, networks, recipe: FeatureRecipe) -> list:
    """The clips' features; a clip that fails makes the comparison meaningless, so it stops the benchmark."""
    results = list(embed_clips(clips, networks, recipe, DEFAULT_BATCH_SIZE))
    failed = [result for result in results if isinstance(result, Failure)]
    if failed:
        raise SystemExit(f"benchmark clip failed: {failed[0].clip_id}: {failed[0].error}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--context-backbone", default="mobilenet_v2")
    parser.add_argument("--track-region", type=float, nargs=2, metavar=("SCALE", "SIZE"),
                        default=(faces.TRACK_REGION_SCALE, faces.TRACK_REGION_SIZE),
                        help="The tracker's square: times the face box, and side in pixels it is resized to.")
    args = parser.parse_args()
    faces.TRACK_REGION_SCALE, faces.TRACK_REGION_SIZE = args.track_region[0], int(args.track_region[1])
    every_values = sorted(set(args.every) | {1})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        entries = {
            kind: [ClipEntry(f"{kind}/{scene}", make_kind(work / f"{kind}-{scene}.mp4".replace(" ", "_"), kind, scene,
                                                         args.seconds), "happy", "bench") for scene in SCENES]
            for kind in KINDS
        }
        recipe = recipe_of(ExtractSettings(split="bench", context_backbone=args.context_backbone, device="cpu"))
        networks = load_networks(NetworkChoice.of(recipe, "cpu"))
        detector = networks.detector
        extracted(entries["moving"][:1], networks, recipe)  # warm-up
        print(f"{len(SCENES)} scenes x {len(KINDS)} kinds of {args.seconds:g} s clip, {SIZE[1]}x{SIZE[0]} 25 fps,"
              f" sampled at {recipe.fps:g} fps; tracking square {faces.TRACK_REGION_SCALE:g}x the box at"
              f" {faces.TRACK_REGION_SIZE} px; torch {torch.__version__}, {torch.get_num_threads()} threads")
        results, costs = {}, {}
        for every in every_values:
            counter = CountingDetector(detector)
            networks.detector = counter
            started = time.perf_counter()
            results[every] = {
                kind: extracted(clips, networks, replace(recipe, detect_every=every))
                for kind, clips in entries.items()
            }
            costs[every] = (counter, time.perf_counter() - started)
        base, base_seconds = costs[1]
        print(f"\n{'K':>2} {'detector calls':>14} {'frames in':>9} {'pixels':>7} {'detect time':>11} {'extract time':>12}")
        for every, (counter, seconds) in costs.items():
            print(f"{every:>2} {counter.calls:>14} {counter.frames:>9} {counter.pixels / base.pixels:>7.2f}"
                  f" {counter.seconds / base.seconds:>11.2f} {seconds / base_seconds:>12.2f}")
        print(f"   (K=1: {base.frames / base.seconds:.1f} frames/s detection,"
              f" {base.frames / base_seconds:.1f} frames/s whole extraction)")
        print(f"\n{'clips':<10} {'K':>2} {'IoU tracked':>11} {'has_face differs':>16} {'face cosine':>11}"
              f" {'IoU hold':>9} {'IoU interp.':>11}")
        for kind in KINDS:
            for every in every_values[1:]:
                a = agreement(results[1][kind], results[every][kind], every)
                print(f"{kind:<10} {every:>2} {a['iou']:>11.3f} {a['differ']:>16.1%} {a['cosine']:>11.4f}"
                      f" {a['hold']:>9.3f} {a['interpolate']:>11.3f}")


if __name__ == "__main__":
    main()
