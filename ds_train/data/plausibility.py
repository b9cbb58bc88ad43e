"""Rows that load fine but are probably wrong: a text far too long or too short for its audio (a transcript pasted
on the wrong clip), and duplicate rows. Reported as warnings in the data report; `data.plausibility=error` makes
them bad samples that stop `prepare`."""

from __future__ import annotations

from typing import Callable, Optional

from boson_multimodal.data_types import AudioContent, TextContent

from ds_train.data.audio import AudioError, audio_info
from ds_train.data.manifest import Record, contents

# Read speech runs at ~10-20 characters per second in alphabetic scripts and ~3-8 in CJK; outside these bounds
# the text almost certainly does not belong to the clip.
CHARS_PER_SECOND = (1.0, 40.0)


def plausibility_warnings(records: list[Record], seconds_of: Callable[[str], float] = None) -> list[dict]:
    """[{"source", "reason"}] for each implausible or duplicate good record, in manifest order. `seconds_of(path)`
    gives a clip's duration (default: its header; prepare passes one that remembers durations across runs)."""
    seconds_of = seconds_of or (lambda path: audio_info(path)[1])
    warnings, first_of = [], {}
    for rec in records:
        if rec.sample is None:
            continue  # reported as bad already
        if rec.key in first_of:
            warnings.append({"source": rec.source, "reason": f"duplicate of {first_of[rec.key]} (same text and audio)"})
            continue
        first_of[rec.key] = rec.source
        reason = _rate_problem(rec, seconds_of)
        if reason:
            warnings.append({"source": rec.source, "reason": reason})
    return warnings


def _rate_problem(rec: Record, seconds_of: Callable[[str], float]) -> Optional[str]:
    target = _target_pair(rec.sample)
    if target is None:
        return None
    text, path = target
    try:
        seconds = seconds_of(path)  # the header only
    except (AudioError, OSError):
        return None  # a broken clip is a bad sample, reported by validate
    if seconds <= 0:
        return None
    rate = len(text.strip()) / seconds
    low, high = CHARS_PER_SECOND
    if low <= rate <= high:
        return None
    return (f"{len(text.strip())} characters of text for {seconds:.1f}s of audio ({rate:.1f} chars/s; speech is "
            f"{low:g}-{high:g}): does the text belong to {path}?")


def _target_pair(sample) -> Optional[tuple[str, str]]:
    """(the text spoken in the trained audio, its file): the last audio clip and the last text before it."""
    text, pair = None, None
    for message in sample.messages:
        for c in contents(message):
            if isinstance(c, str) or isinstance(c, TextContent):
                if message.role == "user":
                    text = c if isinstance(c, str) else c.text
            elif isinstance(c, AudioContent) and message.role == "assistant" and text is not None:
                pair = (text, c.audio_url)
    return pair
