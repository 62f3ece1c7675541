"""The device and precision paths of the frozen networks, exercised on the CPU (no GPU here).

What can be checked without a GPU is checked: how a device is chosen and refused, how many
frames go into a call on each kind of device, which dtype each precision computes in, and
that float16, the GPU's half precision, gives features close to float32's (autocast on the
CPU runs the same casts).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devices import autocast, checked_precision
from extract.face_cnn import FaceCNN
from extract.runtime import (
    CPU_FRAMES_PER_CALL, GPU_FRAMES_PER_CALL, InputNormalisation, as_nhwc_uint8, frames_per_call, network_input,
    prepared_for_inference, with_batch_norms_folded,
)
from tests.media import ASTRONAUT_FACE_BOX, photo

ROOT = Path(__file__).resolve().parents[1]


def test_calls_are_small_on_the_cpu_and_large_on_a_gpu():
    assert frames_per_call(torch.device("cpu")) == CPU_FRAMES_PER_CALL < GPU_FRAMES_PER_CALL
    assert frames_per_call(torch.device("cuda", 0)) == GPU_FRAMES_PER_CALL


@pytest.mark.parametrize("precision, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                              ("float16", torch.float16)])
def test_each_precision_computes_in_its_dtype(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        assert layer(torch.ones(2, 4)).dtype == dtype


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="choose from float32, bfloat16, float16"):
        checked_precision("int8")


def test_frames_are_checked_and_made_contiguous():
    flipped = np.zeros((2, 8, 8, 3), np.uint8)[:, ::-1]
    assert as_nhwc_uint8(flipped).is_contiguous()
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames shaped \(N, H, W, 3\)"):
        as_nhwc_uint8(np.zeros((2, 8, 8), np.uint8))


def test_half_precision_face_features_are_close_to_float32(weight_path):
    x1, y1, x2, y2 = ASTRONAUT_FACE_BOX
    face = photo("astronaut")[y1:y2, x1:x2]
    faces = np.stack([face, face[:, ::-1]])
    full = FaceCNN(weight_path("mini-xception-fer2013"), device="cpu").embed(faces)
    half = FaceCNN(weight_path("mini-xception-fer2013"), device="cpu", precision="float16").embed(faces)
    assert half.features.dtype == torch.float32, "outputs come back in float32 whatever the precision"
    assert F.cosine_similarity(full.features, half.features).min() > 0.999
    assert torch.equal(full.logits.argmax(1), half.logits.argmax(1))


def test_batch_norms_after_convolutions_are_folded_without_changing_the_output():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    alone = torch.nn.BatchNorm2d(8)  # not after a convolution in a Sequential: kept
    model = torch.nn.Sequential(inner, alone).eval()
    for norm in (inner[1], alone):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    folded = with_batch_norms_folded(model)
    assert isinstance(folded[0][1], torch.nn.Identity) and folded[1] is alone
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_channel_order_and_scale_fold_into_the_first_convolution_exactly_even_at_the_borders():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    bgr = InputNormalisation(channels=(2, 1, 0), mean=(104.0, 117.0, 123.0), std=(58.0, 57.0, 57.5))
    frames = torch.from_numpy(np.stack([photo("astronaut")[:64, :96], photo("chelsea")[:64, :96]]))
    pixels = frames.permute(0, 3, 1, 2).float()[:, list(bgr.channels)]
    normalised = (pixels - torch.tensor(bgr.mean).view(1, 3, 1, 1)) / torch.tensor(bgr.std).view(1, 3, 1, 1)
    expected = model.eval()(normalised)
    folded = prepared_for_inference(model, torch.device("cpu"), bgr)
    ready = network_input(frames, bgr, torch.device("cpu"))
    assert ready.dtype == torch.float32 and ready.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(folded(ready), expected, rtol=1e-5, atol=1e-4)


def test_a_network_whose_first_convolution_does_not_read_rgb_is_refused():
    gray = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3))
    with pytest.raises(ValueError, match="does not read an RGB image"):
        prepared_for_inference(gray, torch.device("cpu"), InputNormalisation((0, 1, 2), (0, 0, 0), (1, 1, 1)))


FAULTS_PER_ALLOCATION = """
import resource, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from extract.runtime import keep_freed_memory_for_reuse


def faults_per_allocation():
    np.ones(1 << 20, np.uint8)  # once first: a heap that has to grow for it faults once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        np.ones(1 << 20, np.uint8)  # 1 MiB: above an mmap threshold pinned at 128 KiB
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100


print(faults_per_allocation(), keep_freed_memory_for_reuse(), faults_per_allocation())
"""


def test_freed_memory_is_reused_even_where_dask_pins_the_mmap_threshold():
    # Dask's nanny starts its workers with this variable; glibc then maps and zeroes every 1 MiB afresh.
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, str(ROOT)], env=env, capture_output=True,
                          text=True, check=True)
    before, applied, after = done.stdout.split()
    assert applied == "True"
    assert float(before) > 200 and float(after) < 1  # a 1 MiB block is 256 pages
