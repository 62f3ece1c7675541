"""The frozen networks: our wrappers against the bare models, and the ways to run them faster.

    python benchmarks/networks_benchmark.py
    python benchmarks/networks_benchmark.py --frames 128 --onnx

For each network (RetinaFace MobileNet-0.25 on 640x360 frames, mini-Xception on face crops,
the context CNNs on frames), on real pixels (the extract benchmark's clips):

- "bare model": the network called directly on ready float tensors at its best batch size,
  float32, the same threads: the reference the issue measures our wrapper against;
- the wrapper as stage 1 calls it (uint8 frames in, features out, with its preprocessing and
  its own frames per call) in
  float32 and in each faster way to run it: channels-last, bfloat16 autocast, both, and
  `torch.compile`; with `--onnx`, ONNX Runtime on the bare model;
- for each way, how far its outputs are from float32 (features: worst cosine similarity and
  largest difference relative to the features' scale; detector: worst box IoU and score
  difference of matched faces).

Figures are printed, never asserted. SqueezeNet runs with random weights (its file is not
obtainable offline): speed does not depend on the values of the weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.extract_benchmark import SCENES, alternated, make_clip, median_ratio  # noqa: E402
from extract.context_cnn import ContextCNN, context_crops  # noqa: E402
from extract.face_cnn import FaceCNN, _to_model_input  # noqa: E402
from devices import PRECISIONS  # noqa: E402
from extract.faces import crop_every_face  # noqa: E402
from extract.retinaface import RetinaFaceDetector  # noqa: E402
from extract.runtime import keep_freed_memory_for_reuse  # noqa: E402
from extract.video import sample_frames  # noqa: E402

BATCH_SIZES = (4, 8, 16, 32, 64, 128)


def best_rate(fn, inputs: torch.Tensor, batch_sizes=BATCH_SIZES, repeats: int = 3) -> tuple[float, int]:
    """Best items/s of fn over batches of `inputs`, and the batch size that gave it."""
    best = (0.0, 0)
    for size in batch_sizes:
        fn(inputs[:size])  # warm-up: oneDNN picks its kernels per shape
        seconds = min(timed_pass(fn, inputs, size) for _ in range(repeats))
        best = max(best, (len(inputs) / seconds, size))
    return best


def timed_pass(fn, inputs: torch.Tensor, size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(inputs), size):
        fn(inputs[i : i + size])
    return time.perf_counter() - start


def feature_gap(reference: torch.Tensor, other: torch.Tensor) -> str:
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(1), other.flatten(1), dim=1).min().item()
    relative = ((other - reference).abs().max() / reference.abs().max()).item()
    return f"min cosine {cosine:.5f}, max |diff| {relative:.2e} of max |feature|"


def detection_gap(reference, other) -> str:
    """Worst IoU of each reference box with the other run's best-overlapping box, and score gap."""
    from torchvision.ops import box_iou

    ious, score_gaps, count_gaps = [], [], 0
    for a, b in zip(reference, other):
        count_gaps += len(a.boxes) != len(b.boxes)
        if len(a.boxes) and len(b.boxes):
            iou = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes))
            best = iou.max(dim=1)
            ious.append(best.values.min().item())
            score_gaps.append(np.abs(a.scores - b.scores[best.indices.numpy()]).max())
    return (f"min IoU {min(ious, default=float('nan')):.4f}, max score diff {max(score_gaps, default=0):.4f},"
            f" frames with another face count {count_gaps}/{len(reference)}")


def real_frames(work: Path, count: int) -> torch.Tensor:
    paths = [make_clip(work / f"clip{i}.mp4", SCENES[i % 3], 10) for i in range(3)]
    frames = [f.image for path in paths for f in sample_frames(path)]
    return torch.from_numpy(np.stack(frames[:count]))


def compile_model(net) -> None:
    net.model = torch.compile(net.model)


def compile_features(net) -> None:
    """The context CNNs call `model.features`, which compiling `model` would not reach."""
    net.model.features = torch.compile(net.model.features)


def network_rows(title: str, unit: str, make, bare_call, ready: torch.Tensor, run, gap, data, compile_too: bool,
                 precisions: list[str], bare_sizes=BATCH_SIZES, compile_net=compile_model) -> tuple[list[str], object]:
    """One network: its bare model, then its wrapper in each precision (and compiled), against float32.

    make(precision) builds the wrapper, bare_call(wrapper) its bare model on ready tensors,
    run(wrapper, data) the wrapper as stage 1 calls it; gap compares two runs' outputs.
    """
    reference_net = make("float32")
    bare_model = torch.inference_mode()(bare_call(reference_net))  # as the wrappers run
    bare, bare_batch = best_rate(bare_model, ready, bare_sizes)
    rows = [f"{title} bare model (float32, best batch {bare_batch}): {bare:.1f} {unit}"]
    reference = run(reference_net, data)
    variants = [(precision, make(precision)) for precision in precisions]
    if compile_too:
        compiled = make("float32")
        compile_net(compiled)
        variants.append(("compiled float32", compiled))
    for label, net in variants:
        bare_now, rate, ratio = alternated_rates(bare_model, ready, bare_batch, lambda x: run(net, x), data)
        rows.append(f"  wrapper, {label:<16} {rate:7.1f} {unit} = {ratio:.2f}x bare (median of rounds; bare"
                    f" {bare_now:.1f} in them); vs float32: {gap(reference, run(net, data))}")
    return rows, reference


def alternated_rates(bare, ready: torch.Tensor, bare_batch: int, wrapper, data,
                     rounds: int = 7) -> tuple[float, float, float]:
    """The bare model (at its best batch) and the wrapper timed in turns: each one's best items/s
    and the median over rounds of the wrapper's speed relative to the bare model's."""
    wrapper(data[:bare_batch])  # warm-up: oneDNN picks its kernels per shape
    bare_seconds, wrapper_seconds = alternated(
        lambda: timed_pass(bare, ready, bare_batch), lambda: timed_pass(wrapper, data, len(data)), rounds=rounds
    )
    ratio = len(data) / len(ready) * median_ratio(bare_seconds, wrapper_seconds)
    return len(ready) / min(bare_seconds), len(data) / min(wrapper_seconds), ratio


def detector_rows(frames: torch.Tensor, compile_too: bool, precisions: list[str]) -> tuple[list[str], list]:
    return network_rows(
        "RetinaFace", "frames/s", lambda precision: RetinaFaceDetector(device="cpu", precision=precision),
        lambda net: net.model, RetinaFaceDetector(device="cpu")._prepare(frames),
        lambda net, x: net.detect(x), detection_gap, frames, compile_too, precisions,
    )


def face_cnn_rows(crops: torch.Tensor, compile_too: bool, precisions: list[str]) -> list[str]:
    return network_rows(
        "face CNN", "faces/s", lambda precision: FaceCNN(device="cpu", precision=precision),
        lambda net: net.model, _to_model_input(crops),
        lambda net, x: net.embed(x).features, feature_gap, crops, compile_too, precisions, (*BATCH_SIZES, 256),
    )[0]


def context_rows(backbone: str, squares: torch.Tensor, compile_too: bool, precisions: list[str]) -> list[str]:
    def make(precision: str) -> ContextCNN:
        if backbone == "squeezenet1_1":
            return ContextCNN.random_init(backbone, device="cpu", precision=precision)
        return ContextCNN(backbone, device="cpu", precision=precision)

    return network_rows(
        f"context CNN {backbone}", "frames/s", make, lambda net: net.model.features, make("float32")._prepare(squares),
        lambda net, x: net.embed(x), feature_gap, squares, compile_too, precisions, compile_net=compile_features,
    )[0]


def onnx_rows(frames: torch.Tensor, squares: torch.Tensor, work: Path) -> list[str]:
    """ONNX Runtime on the bare models (float32), against the same models in PyTorch.

    The face CNN is left out: its TensorFlow-style asymmetric padding does not survive the
    export with a dynamic batch (ONNX Runtime refuses a residual sum), and it is already
    within 10% of its bare model.
    """
    import onnxruntime

    networks = {
        "RetinaFace": (RetinaFaceDetector(device="cpu"), lambda n, x: n._prepare(x), lambda n: n.model, frames),
        "context CNN mobilenet_v2": (ContextCNN("mobilenet_v2", device="cpu"), lambda n, x: n._prepare(x),
                                     lambda n: n.model.features, squares),
    }
    rows = []
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    for name, (network, prepare, module, data) in networks.items():
        ready = prepare(network, data[:64])
        path = work / f"{name.replace(' ', '_')}.onnx"
        torch.onnx.export(module(network), (ready[:1],), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        torch_rate, _ = best_rate(lambda x: module(network)(x), ready, (4, 8, 16))
        ort_rate, _ = best_rate(lambda x: session.run(None, {"x": x.contiguous().numpy()}), ready, (4, 8, 16))
        rows.append(f"{name}: ONNX Runtime {ort_rate:.1f}/s vs PyTorch {torch_rate:.1f}/s = {ort_rate / torch_rate:.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=128, help="Real frames to run each network on.")
    parser.add_argument("--compile", action="store_true", help="Also try torch.compile (slow to warm up).")
    parser.add_argument("--onnx", action="store_true", help="Also try ONNX Runtime (pip install onnxruntime onnx).")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="Wrapper precisions to run (float16 takes minutes on a CPU).")
    args = parser.parse_args()
    torch.manual_seed(0)
    keep_freed_memory_for_reuse()  # as `extract` does; bare models and wrappers share the process
    with tempfile.TemporaryDirectory() as tmp:
        frames = real_frames(Path(tmp), args.frames)
        print(f"{len(frames)} real frames {tuple(frames.shape[1:3])}; torch {torch.__version__},"
              f" {torch.get_num_threads()} threads")
        rows, detections = detector_rows(frames, args.compile, args.precisions)
        crops = torch.from_numpy(crop_every_face(frames, detections)[0])
        crops = crops.repeat(max(1, 512 // max(len(crops), 1)), 1, 1, 1)[:512]
        squares = context_crops(frames)
        rows += face_cnn_rows(crops, args.compile, args.precisions)
        for backbone in ("mobilenet_v2", "squeezenet1_1"):
            rows += context_rows(backbone, squares, args.compile, args.precisions)
        if args.onnx:
            rows += onnx_rows(frames, squares, Path(tmp))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
