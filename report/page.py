"""The report's one self-contained HTML page: pictures inline as data: URIs, a style sheet and no script,
nothing fetched from anywhere, so it opens from a mail attachment or a shared drive.

Every string that comes from a file (clip ids, labels, paths, attributes, failure messages) is
HTML-escaped, and cut short where a file could hold megabytes in one string.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from extract.audio import EGEMAPS_DESCRIPTORS
from features.failures import STAGES
from features.tools import has_no_track, plural, unread_because
from report.audio import Voice
from report.choice import CLIPS_PER_RULE, RULES, SAMPLE_SEED
from report.facts import SetFacts
from report.figures import Overview
from report.sheets import ClipSheet

MAX_TEXT_CHARS = 300
JPEG_QUALITY = 85
FIRST_MESSAGES = 3  # failure messages shown per stage
FIRST_UNREAD = 10  # clips whose audio could not be read, listed per set
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1800px; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; font-size: 0.9em; }
td.key { white-space: nowrap; color: #555; }
.sets { display: flex; flex-wrap: wrap; gap: 2em; }
.caption, .rule, .facts { color: #555; }
.alert { color: #b00020; font-weight: bold; }
.clip { border-top: 1px solid #ddd; padding: 0.6em 0; }
.clip h3 { margin: 0; font-size: 1em; font-family: monospace; word-break: break-all; }
.note { color: #b00020; margin: 0.2em 0; }
.frames { display: flex; flex-wrap: wrap; gap: 10px; margin: 0.4em 0; }
figure { margin: 0; } figcaption { font-size: 0.8em; color: #555; text-align: center; }
.pair { display: flex; gap: 2px; }
.missing { width: 128px; height: 128px; background: #eee; color: #888; display: flex; align-items: center;
  justify-content: center; font-size: 0.8em; text-align: center; }
.overviews { display: flex; flex-wrap: wrap; gap: 1em 2em; }
figure.overview { max-width: 640px; } figure.overview img { max-width: 100%; }
img.timeline { display: block; max-width: 100%; }
"""


def text(value) -> str:
    """A value from a file, as the page shows it: cut to MAX_TEXT_CHARS and HTML-escaped."""
    value = str(value)
    if len(value) > MAX_TEXT_CHARS:
        value = value[:MAX_TEXT_CHARS] + f"... ({len(value) - MAX_TEXT_CHARS} more characters)"
    return html.escape(value, quote=True)


def photo_uri(image: np.ndarray) -> str:
    """A frame or a face crop, as JPEG: the demo's report holds 191 of them in 1.2 MB, which take 6.7 MB as PNG,
    and a page of the default 24 sampled clips and up to 20 worth a look should still go by mail."""
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="JPEG", quality=JPEG_QUALITY)
    return data_uri(data.getvalue(), "image/jpeg")


def drawing_uri(image: np.ndarray) -> str:
    """A drawing of flat colours and sharp edges (the face strip), as PNG."""
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="PNG")
    return data_uri(data.getvalue(), "image/png")


def data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode("ascii")


def table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><td class='key'>{text(key)}</td><td>{text(value)}</td></tr>" for key, value in rows)
    return f"<table>{cells}</table>"


def summary_table(facts: SetFacts) -> str:
    summary = facts.summary
    attributes = summary.attributes + [("differing between shards", ", ".join(summary.differing))] * bool(
        summary.differing)
    return (f"{table(summary.facts)}<details><summary>attributes ({len(attributes)}): how the features were made"
            f"</summary>{table(attributes)}</details>")


def alerts(facts: SetFacts) -> list[str]:
    """What a reader must not miss about a set, each one line."""
    lines = []
    if facts.clips and not len(facts.scores):
        lines.append("No frame of this set has a face: check the videos (are there people in them?) and the"
                     " detector's settings before training on it.")
    else:
        faceless = sum(clip.faces == 0 for clip in facts.clips)
        if faceless:
            lines.append(f"{faceless} of {len(facts.clips)} clips have no face in any frame.")
    audio = facts.summary.audio
    if audio and facts.clips and not audio.frames_with_audio:
        lines.append("No frame of this set has audio: check that the videos have sound, and the clips whose audio"
                     " could not be read.")
    unreadable = [file for file in facts.failures if file.unreadable is not None]
    lines += [f"{file.path}: unreadable ({file.unreadable})" for file in unreadable]
    return lines


def unread_audio_section(facts: SetFacts) -> str:
    """The clips of a set that hears whose audio track could not be read whole, with why; nothing for a set
    that does not hear."""
    audio = facts.summary.audio
    if audio is None:
        return ""
    listed = "<br>".join(f"<code>{text(clip_id)}</code>: {text(note)}" for clip_id, note in audio.unread[:FIRST_UNREAD])
    more = len(audio.unread) - FIRST_UNREAD
    listed += f"<br>... and {more} more" if more > 0 else ""
    return f"<h4>Audio not read</h4><p>{listed or 'None: every track found was read whole.'}</p>"


def failures_section(facts: SetFacts) -> str:
    if not facts.failures:
        return "<p>No failures recorded.</p>"
    parts = []
    for file in facts.failures:
        if file.unreadable is not None:
            parts.append(f"<p class='alert'>{text(file.path)}: unreadable ({text(file.unreadable)})</p>")
            continue
        rows = []
        for stage in STAGES:
            failed = [failure for failure in file.failures if failure.stage == stage]
            if failed:
                first = failed[:FIRST_MESSAGES]
                listed = "<br>".join(f"<code>{text(f.clip_id)}</code>: {text(f.error)}" for f in first)
                more = len(failed) - FIRST_MESSAGES
                listed += f"<br>... and {more} more" if more > 0 else ""
                rows.append(f"<tr><td class='key'>{stage}</td><td>{len(failed)}</td><td>{listed}</td></tr>")
        parts.append(f"<p>{text(file.path)}: {plural(len(file.failures), 'clip')}</p>"
                     f"<table><tr><th>stage</th><th>clips</th><th>first messages</th></tr>{''.join(rows)}</table>")
    return "".join(parts)


def set_section(facts: SetFacts, name: str) -> str:
    alert_lines = "".join(f"<p class='alert'>{text(line)}</p>" for line in alerts(facts))
    return (f"<div><h3>{text(name)}</h3>{alert_lines}{summary_table(facts)}{unread_audio_section(facts)}"
            f"<h4>Failed clips</h4>{failures_section(facts)}</div>")


def overview_section(overviews: list[tuple[Overview, bytes]]) -> str:
    return "<div class='overviews'>" + "".join(
        f"<figure class='overview'><img alt='{text(overview.title)}' src='{data_uri(png, 'image/png')}'>"
        f"<p class='caption'>{text(overview.caption)} ({text(overview.file)})</p></figure>"
        for overview, png in overviews
    ) + "</div>"


def cell_html(cell) -> str:
    frame = (f"<img alt='frame' src='{photo_uri(cell.frame)}'>" if cell.frame is not None
             else "<div class='missing'>frame not available</div>")
    crop = (f"<img alt='face crop' src='{photo_uri(cell.crop)}'>" if cell.crop is not None
            else f"<div class='missing'>{'no face' if not cell.has_face else 'crop not available'}</div>")
    face = f"score {cell.score:.2f}" if cell.has_face else "no face"
    return (f"<figure><div class='pair'>{frame}{crop}</div>"
            f"<figcaption>frame {cell.position}, {cell.time:.2f} s, {face}</figcaption></figure>")


def voice_facts(voice: Voice) -> str:
    """A clip's audio as its row's facts say it."""
    track, heard = voice.track, int(np.count_nonzero(voice.has_audio))
    if track is not None and has_no_track(track):
        return "no audio track"
    stored = ""
    if track is not None and track.codec:
        stored = f" ({text(track.codec)}, {track.rate} Hz, {plural(track.channels, 'channel')})"
    return f"audio in {heard} of {plural(len(voice.has_audio), 'frame')}{stored}"


def voice_html(sheet: ClipSheet) -> tuple[str, str, str]:
    """A row's audio: its facts, its note when the track could not be read whole, and its strip; nothing for a set
    that does not hear."""
    voice = sheet.voice
    if voice is None:
        return "", "", ""
    note = unread_because(voice.track) if voice.track is not None else ""
    return (f" · {voice_facts(voice)}", f"<p class='note'>audio: {text(note)}</p>" if note else "",
            f"<img class='timeline' alt='audio' title='{text(voice.scale())}' src='{drawing_uri(sheet.audio_strip)}'>")


def clip_html(sheet: ClipSheet, names: list[str]) -> str:
    clip = sheet.chosen.clip
    score = f", mean score {clip.mean_score:.2f}" if clip.faces else ""
    heard, audio_note, audio_strip = voice_html(sheet)
    facts = (f"{text(names[clip.folder])} · label {text(clip.label or 'unlabelled')} · face in {clip.faces} of"
             f" {clip.frames} frames ({clip.face_rate:.0%}){score} · {clip.jumps} jumps · {clip.duration:.1f} s"
             f"{heard}")
    why = f"<p class='rule'>why: {text(', '.join(sheet.chosen.reasons))}</p>" if sheet.chosen.reasons else ""
    notes = "".join(f"<p class='note'>{text(note)}</p>" for note in sheet.notes) + audio_note
    cells = "".join(cell_html(cell) for cell in sheet.cells)
    return (f"<div class='clip'><h3>{text(clip.clip_id)}</h3><p class='facts'>{facts}</p>{why}{notes}"
            f"<div class='frames'>{cells}</div>{audio_strip}"
            f"<img class='timeline' alt='frames with a face' src='{drawing_uri(sheet.timeline)}'></div>")


def rules_caption(applying: dict[str, int], clips: int) -> str:
    items = "".join(f"<li><b>{rule.name}</b>: {text(rule.caption)} ({applying[rule.name]} of"
                    f" {plural(clips, 'clip')})</li>" for rule in RULES)
    return (f"<p class='caption'>Up to {CLIPS_PER_RULE} clips by each rule, most telling first (ties in the sets'"
            f" order); a clip chosen by several rules is shown once.</p><ul>{items}</ul>")


AUDIO_CAPTION = (
    "For a set that hears, the strip above that one is the clip's stored audio on the same frames, one column"
    " each: for log-mel features the mean of each of its bands over the frame's window, low bands at the bottom,"
    " black for silence and brightest for the clip's loudest band; for other features (eGeMAPS) the mean of each"
    f" value, the first ({EGEMAPS_DESCRIPTORS[0]} for eGeMAPS) at the bottom, each from its lowest to its highest"
    " in the clip. Grey columns are frames without audio (no track, a track that starts late or ends early, audio"
    " that could not be read). Look for grey where the clip should be heard, and for bright bands where a voice is."
)
SHEET_CAPTION = (
    "Each row: frames spread over the clip, decoded again from its video at the stored times, with the stored"
    " main-face box in green; beside each, the face crop the face CNN saw (the first frame without a face and"
    " both sides of the first jump are always among them). The strip below marks every sampled frame, green"
    " with a face and red without; the ticks are the frames shown. Look for boxes on the wrong"
    " person, on no face at all, or jumping between people, and for red where a face is plainly there."
)


def page(sets: list[SetFacts], names: list[str], overviews: list[tuple[Overview, bytes]],
         worth: list[ClipSheet], applying: dict[str, int], sampled: list[ClipSheet]) -> str:
    """The whole page."""
    clips = sum(len(facts.clips) for facts in sets)
    sections = [
        "<h1>Feature set report</h1>",
        "<p>" + "<br>".join(f"{text(name)}: {text(facts.path)}" for facts, name in zip(sets, names)) + "</p>",
        "<h2>Numbers</h2><p class='caption'>As <code>python cli.py features inspect</code> prints them, and the"
        " clips the extractor could not extract, by stage, with the first messages.</p>",
        "<div class='sets'>" + "".join(set_section(facts, name) for facts, name in zip(sets, names)) + "</div>",
        "<h2>Overview</h2>",
        overview_section(overviews),
        "<h2>Clips worth a look</h2>",
        rules_caption(applying, clips),
        f"<p class='caption'>{SHEET_CAPTION}</p>",
        f"<p class='caption'>{AUDIO_CAPTION}</p>" * any(sheet.voice is not None for sheet in worth + sampled),
        "".join(clip_html(sheet, names) for sheet in worth) or "<p>None.</p>",
        "<h2>A random sample</h2>",
        f"<p class='caption'>{len(sampled)} of the {clips} clips, drawn at random (seed {SAMPLE_SEED}, so the"
        " same set gives the same sample), shown as above.</p>",
        "".join(clip_html(sheet, names) for sheet in sampled) or "<p>None.</p>",
    ]
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Feature set report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
