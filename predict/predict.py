"""Predict the emotion of raw videos with a trained run, extracting them exactly as its features were.

The extraction settings come from the run (the recipe of its training features, which its
checkpoint holds), never from the command line, and this machine's weights are checked against
the hashes the run's features were made with: a model is only as good as the features it learnt
from, and features made another way would give predictions that are wrong without saying so.
Frames without a face follow the training policy (train/data.py), so a clip with no face at all
is still predicted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from devices import resolve_device
from errors import UserError
from extract.clips import embed_clips, load_networks, remade_here, weight_names
from extract.settings import DEFAULT_BATCH_SIZE, NetworkChoice, recipe_problems
from extract.runtime import keep_freed_memory_for_reuse
from extract.video import VideoError
from features.failures import Failure, file_stamp, one_line
from features.recipe import FeatureRecipe
from features.schema import ClipFeatures, frame_arrays
from manifests.builders import VIDEO_EXTENSIONS, videos_under
from manifests.manifest import ClipEntry, read_manifest
from manifests.spreadsheet import neutralised
from outputs import OutputError, claim_folder, create_new_file, output_paths, same_file, write_atomically
from predict.explain import explain_clip, thumbnails
from train.config import UNLABELLED
from train.data import clip_steps, collate, model_inputs, step_frames_mask
from train.layout import COMPLETE_MARK
from train.metrics import PROBABILITY_PREFIX
from train.models import CascadeAttentionRNN
from train.runs import LoadedRun, load_run

MANIFEST_SUFFIX = ".csv"
PREDICTIONS_HEADER = "clip_id,path,predicted,"
# In a folder of explanation pictures: says predict made it, so a later predict may write there again.
EXPLAIN_MARK = ".caca-rnn-explain"
PICTURE_SUFFIX = ".png"
# A predicted clip whose picture could not be made fails at this stage (predict writes no failures.csv).
EXPLAIN_STAGE = "explain"


class PredictError(UserError):
    """A problem the user can fix (not a finished run, other weights, no videos); one line."""


@dataclass
class Prediction:
    clip_id: str
    path: str
    predicted: str
    probabilities: dict[str, float]  # class -> probability, in the run's class order
    frames: int  # sampled frames
    frames_with_face: int
    attention: np.ndarray | None  # (second-RNN steps, first-RNN steps) for the CACA models


def finished_run(run: Path, device: torch.device) -> LoadedRun:
    """The run (`train.runs.load_run`), once it is known to be finished (its metrics written, last)."""
    if not (run / COMPLETE_MARK).is_file():
        raise PredictError(
            f"{run} is not a finished training run (no {COMPLETE_MARK}): train one with `python cli.py train`"
        )
    loaded = load_run(run, device)
    if loaded.metrics is None:
        raise PredictError(f"{run / COMPLETE_MARK}: not the metrics of a finished run; train the run again")
    return loaded


def extraction_recipe(run: Path, recipe: FeatureRecipe) -> FeatureRecipe:
    """`recipe`, the recipe of the features the run in `run` learnt from, after checking this machine would
    extract by it the same way.

    The model learnt from context features rounded to the recipe's stored dtype; rounding the
    same way makes a prediction equal to `evaluate`'s on the same clip's extracted features.
    """
    problems = recipe_problems(recipe)
    if problems:
        raise PredictError(f"{run}: the features it was trained on were made in a way this toolkit cannot make"
                           f" ({problems[0]}); retrain the run")
    check_same_extraction(run, recipe, remade_here(recipe))
    return recipe


def check_same_extraction(run: Path, recipe: FeatureRecipe, here: FeatureRecipe) -> None:
    """Refuse a run whose features this machine would not reproduce (other weights or settings):
    `recipe` is the run's, `here` the one this machine makes."""
    names = weight_names(here)
    problems = [
        f"weight {names[key]} here has sha256 {getattr(here, key)}, the run's features were made with"
        f" {getattr(recipe, key)}"
        for key in names
        if getattr(recipe, key) != getattr(here, key)
    ]
    same_weights = replace(recipe, **{key: getattr(here, key) for key in names})
    problems += [f"{difference} (run's != here)" for difference in same_weights.differences(here)]
    if problems:
        raise PredictError(f"{run}: this machine would not make features as the run's were made: {'; '.join(problems)}")


def collect_videos(inputs: list[Path]) -> list[ClipEntry]:
    """The clips to predict: files as given, videos below folders, the clips of manifests (.csv).

    A path that does not exist is kept: it fails like a broken video, and the rest goes on.
    """
    inputs = [Path(p) for p in inputs]
    entries = [e for p in inputs if is_manifest(p) for e in read_manifest(p, check_files=False)]
    short_ids = {}
    for given in inputs:
        if not is_manifest(given):
            top = Path(os.path.normpath(given.absolute())) if given.is_dir() else None
            for found in videos_under(given) if top else [given]:
                path = Path(os.path.normpath(found.absolute()))
                short_ids.setdefault(path, path.relative_to(top).as_posix() if top else path.name)
    entries += entries_by_path(short_ids)
    check_unique_ids(entries)
    if not any(entry.path.is_file() for entry in entries):
        shown = ", ".join(str(p) for p in inputs) or "nothing"
        raise PredictError(f"no videos found in {shown} (videos are {', '.join(sorted(VIDEO_EXTENSIONS))})")
    return entries


def is_manifest(path: Path) -> bool:
    return path.suffix.lower() == MANIFEST_SUFFIX


def entries_by_path(short_ids: dict[Path, str]) -> list[ClipEntry]:
    """Each video's short id (its path below the folder given, or the name of a file given) when
    no two collide; else every id is the path below the videos' common folder, which never collide."""
    if len(set(short_ids.values())) < len(short_ids):
        common = Path(os.path.commonpath([p.parent for p in short_ids]))
        short_ids = {p: p.relative_to(common).as_posix() for p in short_ids}
    return [ClipEntry(clip_id, p, None, None) for p, clip_id in short_ids.items()]


def check_unique_ids(entries: list[ClipEntry]) -> None:
    first: dict[str, ClipEntry] = {}
    for entry in entries:
        if entry.clip_id in first:
            raise PredictError(
                f"clip id {entry.clip_id!r} is given twice: {first[entry.clip_id].path} and {entry.path}"
            )
        first[entry.clip_id] = entry


def step_frames(has_face: np.ndarray, inputs: tuple[str, ...]) -> np.ndarray:
    """Which sampled frames became the steps of a model of `inputs`: the training policy applied to frame numbers."""
    return np.flatnonzero(step_frames_mask(has_face, inputs))


def as_stored(clip: ClipFeatures, names: tuple[str, ...], context_dtype: str) -> dict[str, np.ndarray]:
    """The clip's arrays `names` in the dtypes a shard stores them in: the model learnt from features
    rounded so, and rounding the same way keeps a prediction equal to `evaluate`'s on the clip."""
    audio_dim = clip.audio.shape[1] if clip.audio is not None else 0
    arrays = frame_arrays(clip.context.shape[1], context_dtype, audio_dim=audio_dim)
    return {name: getattr(clip, name).astype(arrays[name][0]) for name in names}


@torch.inference_mode()
def classify(model: nn.Module, clip: ClipFeatures, context_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities of one clip and, for the CACA models, their attention weights."""
    stored = as_stored(clip, ("has_face", *model.inputs), context_dtype)
    batch = collate([clip_steps(clip.clip_id, stored, UNLABELLED, model.inputs)])
    inputs, mask = model_inputs(model, batch, next(model.parameters()).device)
    attention = None
    if isinstance(model, CascadeAttentionRNN):
        logits, weights = model.forward_with_attention(inputs, mask)
        attention = weights[0].float().cpu().numpy()
    else:
        logits = model(inputs, mask)
    return logits.softmax(dim=-1)[0].float().cpu().numpy(), attention


def attention_streams(model: nn.Module) -> tuple[str, str] | None:
    """The stream the second RNN attends over (the first RNN's) and those it reads ("face and audio"), or None for
    models without attention."""
    if not isinstance(model, CascadeAttentionRNN):
        return None
    return model.first_stream, " and ".join(model.second_streams)


def prediction_of(clip: ClipFeatures, probabilities: np.ndarray, attention, classes: list[str]) -> Prediction:
    return Prediction(
        clip_id=clip.clip_id,
        path=clip.source_path,
        predicted=classes[int(probabilities.argmax())],
        probabilities={name: float(p) for name, p in zip(classes, probabilities)},
        frames=len(clip.timestamps),
        frames_with_face=int(clip.has_face.sum()),
        attention=attention,
    )


def describe(prediction: Prediction) -> str:
    ranked = sorted(prediction.probabilities.items(), key=lambda item: -item[1])
    shares = ", ".join(f"{name} {p:.0%}" for name, p in ranked)
    return (
        f"{prediction.clip_id}: {prediction.predicted} ({prediction.probabilities[prediction.predicted]:.0%})"
        f" | {shares} | face in {prediction.frames_with_face} of {prediction.frames} frames"
    )


def write_predictions_csv(path: Path, predictions: list[Prediction], classes: list[str]) -> Path:
    columns = ["clip_id", "path", "predicted", *(f"{PROBABILITY_PREFIX}{name}" for name in classes),
               "frames", "frames_with_face"]
    rows = [
        {"clip_id": neutralised(p.clip_id), "path": neutralised(p.path), "predicted": neutralised(p.predicted),
         **{f"{PROBABILITY_PREFIX}{name}": p.probabilities[name] for name in classes},
         "frames": p.frames, "frames_with_face": p.frames_with_face}
        for p in predictions
    ]
    frame = pd.DataFrame(rows, columns=columns)
    write_atomically(Path(path), lambda tmp: frame.to_csv(tmp, index=False, encoding="utf-8", lineterminator="\n"))
    return Path(path)


def picture_paths(explain_dir: Path, entries: list[ClipEntry]) -> dict[str, Path]:
    """Each clip's picture: in the same subfolders as its id, inside `explain_dir` whatever the id
    holds, never two clips in one file (`outputs.output_paths`)."""
    relative = output_paths([entry.clip_id for entry in entries], PICTURE_SUFFIX)
    return {clip_id: Path(explain_dir) / path for clip_id, path in relative.items()}


def check_outputs(inputs: list[Path], entries: list[ClipEntry], out_csv: Path | None, explain_dir: Path | None,
                  overwrite: bool) -> None:
    """The predictions file is no input, and no file of a user's unless `overwrite`; the pictures
    go to a folder that is new, empty or made by predict, unless `overwrite`."""
    if out_csv is not None:
        given = [*inputs, *(entry.path for entry in entries)]
        if any(same_file(out_csv, path) for path in given if Path(path).is_file()):
            raise PredictError(f"--out {out_csv} is one of the inputs; choose another file for the predictions")
        if Path(out_csv).exists() and not overwrite and not is_predictions_file(Path(out_csv)):
            raise OutputError(f"{out_csv} exists and is not a predictions file of predict: choose another --out, or"
                              " pass --overwrite to replace it")
    if explain_dir is not None:
        made_here = (Path(explain_dir) / EXPLAIN_MARK).is_file()
        claim_folder(Path(explain_dir), "predict --explain", overwrite, lambda name: made_here)
        create_new_file(Path(explain_dir) / EXPLAIN_MARK, "pictures of `python cli.py predict --explain`\n")


def is_predictions_file(path: Path) -> bool:
    """Whether `path` is a CSV file that predict wrote (its header), which a new run may replace."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.readline(len(PREDICTIONS_HEADER)) == PREDICTIONS_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def predict_videos(
    run: Path,
    inputs: list[Path],
    device: str | None = None,
    explain_dir: Path | None = None,
    out_csv: Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[list[Prediction], list[Failure]]:
    """Predict every video of `inputs` with `run`; videos whose extraction fails are returned as failures.

    Existing files of the user's are never replaced unless `overwrite` (`check_outputs`).
    """
    loaded = finished_run(Path(run), resolve_device(device))
    entries = collect_videos(inputs)
    check_outputs(inputs, entries, out_csv, explain_dir, overwrite)
    recipe = extraction_recipe(loaded.folder, loaded.recipe)
    pictures = picture_paths(explain_dir, entries) if explain_dir is not None else {}
    model, classes = loaded.model, list(loaded.classes)
    keep_freed_memory_for_reuse()
    networks = load_networks(NetworkChoice.of(recipe, device))
    predictions: list[Prediction] = []
    failures: list[Failure] = []
    bar = tqdm(total=len(entries), unit="clip", desc="predict", disable=not progress)
    log = above_bar(log)
    for clip in embed_clips(entries, networks, recipe, DEFAULT_BATCH_SIZE):
        bar.update()
        if isinstance(clip, Failure):
            failures.append(clip)
            log(f"{clip.clip_id}: not predicted: {clip.error}")
            continue
        prediction = prediction_of(clip, *classify(model, clip, recipe.context_dtype), classes)
        predictions.append(prediction)
        log(describe(prediction))
        if explain_dir is not None:
            try:
                explain_clip(
                    pictures[clip.clip_id],
                    thumbnails(Path(clip.source_path), recipe.fps, len(clip.timestamps)),
                    clip.timestamps, clip.box, prediction, classes, loaded.name, attention_streams(model),
                    step_frames(clip.has_face, model.inputs), clip=clip, audio_bands=recipe.audio_bands,
                )
            except (VideoError, OSError) as exc:  # the video changed since it was read, or the disk is full
                failures.append(Failure(clip.clip_id, clip.source_path, EXPLAIN_STAGE, one_line(str(exc)),
                                        file_stamp(Path(clip.source_path))))
                log(f"{clip.clip_id}: picture not written: {exc}")
    bar.close()
    if out_csv is not None:
        write_predictions_csv(out_csv, predictions, classes)
    return predictions, failures


def above_bar(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` that clears the progress bar first and redraws it after, so lines and bar don't mix."""

    def write(line: str) -> None:
        with tqdm.external_write_mode():
            log(line)

    return write
