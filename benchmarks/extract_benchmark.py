"""Stage 1 throughput and memory: each stage alone, then end to end, on real-pixel clips.

    python benchmarks/extract_benchmark.py                       # 12 synthetic 10 s clips, 640x360
    python benchmarks/extract_benchmark.py --clips 24 --seconds 20 --context-backbone squeezenet1_1

The clips are real photographs (scikit-image) with a real face moving across real scenes,
encoded with H.264 at 25 fps. Figures are printed, never asserted: machines are noisy. Each
of the speed issue's targets is printed as a ratio measured in this one run:

1. decode: sampling at 5 fps against a bare PyAV loop (decoding every frame, converting the
   kept ones to RGB) and against `ffmpeg -vf fps=5 -pix_fmt rgb24` (Debian's ffmpeg,
   installed with apt-get when missing and possible);
3. overlap: end to end against the sum of the stages measured alone;
4. workers: `--workers N` against one worker, in clips/s;
6. memory: peak RSS of fresh processes extracting one short and one long clip;
7. absolute: end-to-end sampled frames/s, in float32 and in bfloat16;
8. audio (issue 24): extraction with the voice (the default, log-mel) against `--audio-features
   none`, and the audio alone (reading each track and its features, extract/audio.py) against
   a bare loop (PyAV decode and resample, librosa's mel spectrogram of the whole track).

Every clip has a speech-like AAC track (44.1 kHz stereo: a voice's harmonics with a syllable
rhythm, over noise), as CHEAVD's clips do. `--only audio` measures target 8 alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import av  # noqa: E402

from extract.context_cnn import context_crops  # noqa: E402
from extract.faces import crop_every_face, detect_downscaled  # noqa: E402
from extract.audio import TrackReader, framer_for  # noqa: E402
from extract.clips import load_networks, recipe_of  # noqa: E402
from extract.pipeline import extract_split, feature_attrs  # noqa: E402
from extract.runtime import keep_freed_memory_for_reuse  # noqa: E402
from extract.settings import ExtractSettings, NetworkChoice  # noqa: E402
from extract.video import _TOLERANCE as SAMPLING_TOLERANCE, probe, read_audio, sample_frames  # noqa: E402
from features.schema import ClipFeatures  # noqa: E402
from features.writer import ShardWriter  # noqa: E402
from manifests.manifest import ClipEntry, write_manifest  # noqa: E402
from tests.media import photo, write_av_clip  # noqa: E402

SCENES = ("coffee", "rocket", "chelsea")
SIZE = (360, 640)


def scene_frame(scene: str) -> np.ndarray:
    image = torch.from_numpy(photo(scene)).permute(2, 0, 1)[None].float()
    resized = torch.nn.functional.interpolate(image, size=SIZE, mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


AUDIO_RATE = 44100


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Two channels of a voice-like sound: harmonics of a wandering pitch, four syllables a second, over noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * AUDIO_RATE)) / AUDIO_RATE
    pitch = 160 + 40 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / AUDIO_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8)) * np.maximum(0, np.sin(2 * np.pi * 4 * t)) ** 2
    signal = 0.2 * voice + 0.01 * rng.normal(size=len(t))
    return np.stack([signal, signal])


def make_clip(path: Path, scene: str, seconds: float) -> Path:
    background, head = scene_frame(scene), photo("astronaut")[20:180, 140:300]
    frames = []
    for i in range(int(seconds * 25)):
        frame = background.copy()
        x = int(20 + (i * 3) % (SIZE[1] - 200))
        frame[80:240, x : x + 160] = head
        frames.append(frame)
    return write_av_clip(path, frames, speech_like(seconds, len(path.name)), AUDIO_RATE)


def timed(fn) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def best_of(fn, repeats: int = 3) -> tuple[object, float]:
    """The result and the fastest of `repeats` timings (the least disturbed by other work)."""
    runs = [timed(fn) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def alternated(*runs, rounds: int) -> list[list[float]]:
    """Each of `runs` timed once per round, in turns: seconds[run][round].

    A slow spell of a shared machine hits every run of a round alike, so ratios taken within
    rounds (then their median, `median_ratio`) stay fair where speeds move from minute to
    minute; timing one thing, then the other, compares two different minutes.
    """
    seconds = [[] for _ in runs]
    for _ in range(rounds):
        for times, run in zip(seconds, runs):
            times.append(timed(run)[1])
    return seconds


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return float(np.median(np.array(numerators) / np.array(denominators)))


def bare_decode(paths: list[Path], fps: float) -> tuple[int, int]:
    """The least work that gives the same frames: decode all, convert those on the fps grid."""
    decoded = kept = 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            first, grid = None, 0
            for frame in container.decode(stream):
                decoded += 1
                seconds = float(frame.pts * stream.time_base)
                first = seconds if first is None else first
                if seconds - first >= grid / fps - SAMPLING_TOLERANCE:
                    frame.to_ndarray(format="rgb24")
                    kept += 1
                    while grid / fps - SAMPLING_TOLERANCE <= seconds - first:
                        grid += 1
    return decoded, kept


def ffmpeg_binary() -> str | None:
    """Debian's ffmpeg, installed for the comparison where it is missing and apt-get can."""
    if shutil.which("ffmpeg") is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing Debian's ffmpeg for the decode comparison")
        subprocess.run(["apt-get", "install", "-y", "-qq", "ffmpeg"], capture_output=True)
    return shutil.which("ffmpeg")


def ffmpeg_decode(ffmpeg: str, paths: list[Path], fps: float) -> None:
    for path in paths:
        subprocess.run([ffmpeg, "-v", "error", "-nostdin", "-i", str(path), "-vf", f"fps={fps:g}", "-f", "rawvideo",
                        "-pix_fmt", "rgb24", "-"], stdout=subprocess.DEVNULL, check=True)


def sampled_count(paths: list[Path], fps: float) -> int:
    return sum(1 for p in paths for _ in sample_frames(p, fps=fps))


def decode_rows(paths: list[Path], fps: float, rounds: int = 5) -> tuple[list[str], float]:
    """Target 1, each comparison timed in alternating rounds; returns the rows and the seconds
    per kept frame of our sampler (its best round)."""
    decoded, kept = bare_decode(paths, fps)  # untimed: counts, and the clips into the page cache
    bare, ours = alternated(lambda: bare_decode(paths, fps), lambda: sampled_count(paths, fps), rounds=rounds)
    rows = [
        f"  bare PyAV loop (decode all, convert kept) {decoded / min(bare):8.0f} source frames/s"
        f" ({kept / min(bare):.0f} kept/s)",
        f"  decode + sample at {fps:g} fps (ours)        {decoded / min(ours):8.0f} source frames/s"
        f" ({kept / min(ours):.0f} kept/s) = {median_ratio(ours, bare):.2f}x the bare loop's time"
        f" (median of {rounds} rounds; target <= 1.1)",
    ]
    ffmpeg = ffmpeg_binary()
    if ffmpeg is None:
        rows.append("  ffmpeg: not installed here, comparison not measured")
    else:
        cli, ours_again = alternated(lambda: ffmpeg_decode(ffmpeg, paths, fps), lambda: sampled_count(paths, fps),
                                     rounds=rounds)
        rows.append(f"  ffmpeg -vf fps={fps:g} -pix_fmt rgb24       {decoded / min(cli):8.0f} source frames/s"
                    f"; ours = {median_ratio(ours_again, cli):.2f}x its time (median of {rounds} rounds;"
                    f" target <= 1.2)")
    return rows, min(ours) / kept


def stage_rows(paths: list[Path], settings: ExtractSettings) -> tuple[list[str], float]:
    """Each network stage and the write alone; returns the rows and their summed seconds per frame."""
    clips = [np.stack([f.image for f in sample_frames(p, fps=settings.fps)]) for p in paths]
    sampled = sum(len(c) for c in clips)
    networks = load_networks(NetworkChoice.of(recipe_of(settings), settings.device))
    batches = [torch.from_numpy(c[i : i + settings.batch_size]) for c in clips for i in range(0, len(c), settings.batch_size)]
    detections, detect = best_of(lambda: [detect_downscaled(networks.detector, b) for b in batches])
    crops, crop = best_of(lambda: np.concatenate([crop_every_face(b, d)[0] for b, d in zip(batches, detections)]))
    face = best_of(lambda: networks.face_cnn.embed(crops))[1]
    squares, square = best_of(lambda: torch.cat([context_crops(b) for b in batches]))
    context = best_of(lambda: networks.context_cnn.embed(squares))[1]
    write = best_of(lambda: write_shard(settings, networks.context_cnn.feature_dim, clips))[1]
    rows = [
        f"  RetinaFace detection                     {sampled / detect:8.1f} frames/s",
        f"  face and context crops                   {sampled / (crop + square):8.1f} frames/s",
        f"  face CNN                                 {len(crops) / face:8.1f} faces/s",
        f"  context CNN ({settings.context_backbone:<12})               {sampled / context:8.1f} frames/s",
        f"  shard write (gzip)                       {sampled / write:8.1f} frames/s",
    ]
    return rows, (detect + crop + square + face + context + write) / sampled


def write_shard(settings: ExtractSettings, context_dim: int, clips: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        with ShardWriter(Path(tmp) / "shard-00000.h5", feature_attrs(settings, recipe_of(settings)), settings.context_dtype) as writer:
            for i, clip in enumerate(clips):
                t = len(clip)
                writer.add_clip(ClipFeatures(
                    clip_id=f"c{i}", label="happy", source_path="x", source_fps=25.0, duration=t / settings.fps,
                    timestamps=np.arange(t) / settings.fps, has_face=np.ones(t, bool),
                    face=rng.random((t, 128), np.float32), face_map=rng.random((t, 128, 4, 4), np.float32),
                    context=np.abs(rng.normal(size=(t, context_dim))).astype(np.float32),
                    box=np.tile(np.float32([10, 10, 50, 50]), (t, 1)), score=np.ones(t, np.float32),
                    landmarks=np.full((t, 5, 2), 20, np.float32),
                ))


def audio_rows(paths: list[Path], settings_kwargs: dict, work: Path, rounds: int = 5) -> list[str]:
    """Target 8: extraction with the voice against without, and the audio alone against a bare loop, each timed in
    alternating rounds."""
    heard = prepared_run(paths, dict(settings_kwargs, audio_features="logmel"), work)
    mute = prepared_run(paths, dict(settings_kwargs, audio_features="none"), work)
    with_voice, without = alternated(heard, mute, rounds=rounds)
    recipe = recipe_of(ExtractSettings("bench", **dict(settings_kwargs, audio_features="logmel")))
    framer = framer_for(recipe)
    stamps = {path: [frame.timestamp for frame in sample_frames(path)] for path in paths}

    def ours():
        for path in paths:
            reader = TrackReader(recipe, framer)
            reader.set_video_origin(probe(path).origin)
            read_audio(path, reader)
            reader.heard(stamps[path])

    ears, bare = alternated(ours, lambda: bare_audio(paths, recipe), rounds=rounds)
    seconds = sum(len(times) for times in stamps.values()) / recipe.fps
    return [
        f"8. audio: extraction with the voice {len(paths) / min(with_voice):.2f} clips/s, without"
        f" {len(paths) / min(without):.2f}: {median_ratio(with_voice, without):.3f}x the time (median of {rounds}"
        " rounds; target <= 1.10)",
        f"   the audio alone: {seconds / min(ears):.0f} s of audio a second, {median_ratio(ears, bare):.2f}x a bare loop's"
        f" time (PyAV decode and resample, librosa's mel spectrogram: {seconds / min(bare):.0f} s a second)",
    ]


def bare_audio(paths: list[Path], recipe) -> None:
    """The least work that gives the same analysis frames: decode, resample, one mel spectrogram per track."""
    import librosa

    for path in paths:
        with av.open(str(path)) as container:
            resampler = av.AudioResampler(format="dbl", layout="mono", rate=recipe.audio_rate)
            pieces = [piece.to_ndarray()[0] for frame in container.decode(audio=0) for piece in resampler.resample(frame)]
        mel = librosa.feature.melspectrogram(y=np.concatenate(pieces), sr=recipe.audio_rate, n_fft=512, hop_length=160,
                                             win_length=400, center=True, pad_mode="constant", n_mels=recipe.audio_bands)
        np.log(np.maximum(mel, 1e-10))


def bench_settings(paths: list[Path], settings_kwargs: dict, work: Path) -> ExtractSettings:
    manifest = work / "bench.csv"
    write_manifest([ClipEntry(f"bench/{p.stem}", p, "happy", "bench") for p in paths], manifest)
    return ExtractSettings(split="bench", manifest=manifest, out=work / "out", **settings_kwargs)


def prepared_run(paths: list[Path], settings_kwargs: dict, work: Path):
    """A function running `extract` over `paths` into a fresh folder each time, once warm.

    A first, untimed run on a clip per worker loads the networks (and starts the workers,
    which joblib keeps with their networks): throughput, not start-up, is measured.
    """
    warm_up = bench_settings(paths[: settings_kwargs.get("workers", 1)], settings_kwargs, Path(tempfile.mkdtemp(dir=work)))
    extract_split(warm_up, progress=False, log=lambda line: None)

    def fresh_run():
        settings = bench_settings(paths, settings_kwargs, Path(tempfile.mkdtemp(dir=work)))
        return extract_split(settings, progress=False, log=lambda line: None)

    return fresh_run


def end_to_end(paths: list[Path], settings_kwargs: dict, work: Path) -> tuple[float, float, int]:
    """clips/s, sampled frames/s and frames of the fastest of three `extract` runs (the best of
    three, as each stage alone is timed)."""
    summary, seconds = best_of(prepared_run(paths, settings_kwargs, work))
    return len(paths) / seconds, summary.frames / seconds, summary.frames


def workers_row(paths: list[Path], settings_kwargs: dict, workers: int, work: Path, rounds: int = 3) -> str:
    """Target 4: `workers` workers against one worker on a worker's share of the torch threads
    (and, for information, one worker on all of them), timed in alternating rounds."""
    threads = torch.get_num_threads()
    one = prepared_run(paths, dict(settings_kwargs, workers=1), work)
    many = prepared_run(paths, dict(settings_kwargs, workers=workers), work)

    def one_on_a_share():
        torch.set_num_threads(max(1, threads // workers))
        try:
            one()
        finally:
            torch.set_num_threads(threads)

    all_threads, share, parallel = alternated(one, one_on_a_share, many, rounds=rounds)
    rate = {name: len(paths) / min(seconds) for name, seconds in
            (("all", all_threads), ("share", share), ("parallel", parallel))}
    return (f"4. workers, float32: {workers} workers {rate['parallel']:.2f} clips/s; 1 worker with {threads} threads"
            f" {rate['all']:.2f} clips/s ({median_ratio(all_threads, parallel):.2f}x); 1 worker with a worker's share"
            f" of threads {rate['share']:.2f} clips/s ({median_ratio(share, parallel):.2f}x, median of {rounds} rounds,"
            f" target >= {0.8 * workers:.1f})")


def peak_rss_mb() -> float:
    """This process's own peak resident memory, from Linux's VmHWM.

    Not getrusage's ru_maxrss: Linux carries the parent's peak into a child started by fork
    (or vfork) and exec, so a child's ru_maxrss is at least its parent's peak so far.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_memory_mb(seconds: float, settings_kwargs: dict, work: Path) -> float:
    """Peak RSS of a fresh process extracting one clip of `seconds` seconds."""
    folder = work / f"mem{int(seconds)}"
    folder.mkdir()
    path = make_clip(folder / "clip.mp4", "coffee", seconds)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from pathlib import Path\n"
        "from benchmarks.extract_benchmark import end_to_end, peak_rss_mb\n"
        "end_to_end([Path(%r)], %r, Path(%r))\n"
        "print(peak_rss_mb())\n"
    ) % (str(ROOT), str(path), settings_kwargs, str(folder))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--context-backbone", default="mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="For target 4 (default: the cores).")
    parser.add_argument("--long-seconds", type=float, default=120.0, help="Length of the long clip for memory.")
    parser.add_argument("--only", choices=("all", "audio"), default="all", help="audio: target 8 alone.")
    args = parser.parse_args()
    settings_kwargs = dict(context_backbone=args.context_backbone, batch_size=args.batch_size, device="cpu")
    keep_freed_memory_for_reuse()  # as `extract` does, so that stages alone and end to end run alike
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = [make_clip(work / f"clip{i:03d}.mp4", SCENES[i % 3], args.seconds) for i in range(args.clips)]
        print(f"{args.clips} clips of {args.seconds:g} s, {SIZE[1]}x{SIZE[0]} H.264 25 fps with AAC audio; torch"
              f" {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
        if args.only == "audio":
            print("\n".join(audio_rows(paths, settings_kwargs, work)))
            return
        print("1. decode")
        rows, decode_cost = decode_rows(paths, 5.0)
        print("\n".join(rows))
        for precision in ("float32", "bfloat16"):
            kwargs = dict(settings_kwargs, precision=precision)
            print(f"stages alone, {precision}")
            rows, network_cost = stage_rows(paths, bench_settings(paths, kwargs, work))
            print("\n".join(rows))
            clips_per_s, frames_per_s, frames = end_to_end(paths, kwargs, work)
            stages = 1 / (decode_cost + network_cost)
            print(f"3./7. end to end, {precision}: {frames_per_s:.1f} sampled frames/s ({clips_per_s:.2f} clips/s);"
                  f" the stages one after another would give {stages:.1f}: end to end takes"
                  f" {stages / frames_per_s:.2f}x their summed time (target <= 1.15)")
        print(workers_row(paths, settings_kwargs, args.workers, work))
        short = peak_memory_mb(args.seconds, settings_kwargs, work)
        long = peak_memory_mb(args.long_seconds, settings_kwargs, work)
        print(f"6. peak memory, one {args.seconds:g} s clip: {short:.0f} MB; one {args.long_seconds:g} s clip:"
              f" {long:.0f} MB (ratio {long / short:.2f})")
        print(f"   this process's peak: {peak_rss_mb():.0f} MB")
        print("\n".join(audio_rows(paths, settings_kwargs, work)))


if __name__ == "__main__":
    main()
