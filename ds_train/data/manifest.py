"""Read training manifests into Boson `ChatMLSample`s, each tagged with where it came from (file:line).

Two inputs:
- Boson ChatML: a JSON list or JSONL of ChatMLSample dicts (`messages`, `start_index`, ...).
- A plain TTS manifest (JSONL): `audio`, `text`, optional `speaker`, `language`, `ref_audio` + `ref_text`, and any
  other keys as metadata (`sample.misc`: `duration`, `id`, `emotion`, ...; `language` is there too). It becomes
  the voice-cloning layout Boson's serve engine generates with: system prompt, reference text + reference audio as
  an earlier turn kept out of the loss, then target text and target audio.
Relative audio paths resolve against the manifest's directory.

The other data set forms (a Hugging Face dataset, webdataset tar shards, an LJSpeech folder: data/formats/) are read
into TTS rows and go the same way from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import dacite
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

from ds_train.data import clips, formats

TTS_KEYS = {"audio", "text", "speaker", "language", "ref_audio", "ref_text"}  # checked; any other key is metadata


@dataclass
class Record:
    source: str  # "manifest.jsonl:12", "shard-00003.tar:17" - what error reports and the cache name a sample by
    sample: Optional[ChatMLSample]  # None when the record is bad
    key: str  # content hash (sample + its audio files' bytes): the cache reuses work only for identical input
    error: Optional[str] = None
    order: int = 0  # the record's number in the data set, in record order (a manifest's line; formats.Row)


def read_manifest(path: str, fmt: str = "auto", system_prompt: str = "",
                  digest: Callable[[str], Optional[str]] = None, columns: Optional[dict] = None) -> list[Record]:
    """Every record of the manifest (or data set: data/formats/), good or bad, in record order. `digest(path)` names
    an audio clip by its content, None when there is no such clip (default: its bytes' SHA-1); the prepared cache
    passes one that remembers digests across runs. `columns` (data.columns) maps TTS keys to a data set's columns."""
    digest = digest or _clip_digest
    path = str(path)
    kind = formats.kind_of(path, fmt)
    if kind == "json" and not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = Path(path).resolve().parent
    out = []
    for row in rows(path, fmt, columns):
        source, raw, error, order = row.source, row.raw, row.error, row.order
        if error is not None:
            out.append(Record(source, None, _hash(source, raw), error, order))
            continue
        try:
            sample = _to_sample(raw, fmt if kind == "json" else "tts", system_prompt)
            _resolve_audio(sample, base)
        except (ValueError, TypeError, dacite.DaciteError) as e:
            out.append(Record(source, None, _hash(source, raw), f"does not fit the schema: {e}", order))
            continue
        out.append(Record(source, sample, _sample_key(sample, digest), order=order))
    return out


def rows(path: str, fmt: str = "auto", columns: Optional[dict] = None) -> Iterator[formats.Row]:
    """The raw rows of a manifest or data set, numbered in record order (a manifest's are its line numbers)."""
    kind = formats.kind_of(path, fmt)
    if kind != "json":
        return formats.rows(path, kind, columns)
    return (formats.Row(source, int(source.rsplit(":", 1)[1]), raw, error)
            for source, raw, error in raw_records(path))


def speakers_by_source(path: str, fmt: str = "auto", columns: Optional[dict] = None) -> dict[str, Optional[str]]:
    """{source: speaker or None} of every record: the `speaker` key of a TTS row or a ChatML sample, read without
    converting the records or digesting their audio (the prepared cache keeps no speakers)."""
    return {r.source: r.raw.get("speaker") if isinstance(r.raw.get("speaker"), str) and r.raw["speaker"] else None
            for r in rows(path, fmt, columns) if r.error is None}


def _hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _sample_key(sample: ChatMLSample, digest: Callable[[str], str]) -> str:
    # Audio enters by content, not by path: a data set copied to another disk (new paths, new mtimes) keeps its
    # cache, the same clip named relatively or absolutely is one record, and a re-recorded file is a new one.
    d = to_dict(sample)
    clips = [c for m in d["messages"] for c in (m["content"] if isinstance(m["content"], list) else [m["content"]])
             if isinstance(c, dict) and c.get("type") == "audio"]
    for c in clips:
        c["audio_url"] = digest(c["audio_url"]) or f"missing:{c['audio_url']}"
    return _hash(d)


def _clip_digest(path: str) -> Optional[str]:
    return clips.digest(path) if clips.exists(path) else None


def raw_records(path: str) -> Iterator[tuple[str, object, Optional[str]]]:
    """(source, raw record or the text that failed to parse, error or None) for each record."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8-sig") as f:  # a BOM (some Windows editors write one) is not data
        text = f.read()
    if text.lstrip().startswith("["):  # a JSON list
        yield from _json_list_records(name, text)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        src = f"{name}:{lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            yield src, line, f"invalid JSON: {e.msg} (column {e.colno})"
            continue
        yield (src, item, None) if isinstance(item, dict) else (src, item, "not a JSON object")


def _json_list_records(name: str, text: str) -> Iterator[tuple[str, object, Optional[str]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        yield f"{name}:{e.lineno}", text, f"invalid JSON: {e.msg} (column {e.colno})"
        return
    # Parsed fine; walk it again to name each item by the line it starts on.
    decoder, pos, line, counted = json.JSONDecoder(), text.index("[") + 1, 1, 0
    for item in items:
        pos = _skip_json_space(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_json_space(text, pos) + 1  # past the ',' (or the closing ']')
        src = f"{name}:{line}"
        yield (src, item, None) if isinstance(item, dict) else (src, item, "not a JSON object")


def _skip_json_space(text: str, pos: int) -> int:
    while text[pos] in " \t\r\n":
        pos += 1
    return pos


def _to_sample(raw: dict, fmt: str, system_prompt: str) -> ChatMLSample:
    if fmt == "auto":
        if "messages" not in raw and "audio" not in raw:
            raise ValueError(f"neither a ChatML sample ('messages') nor a TTS row ('audio', 'text'): {sorted(raw)}")
        fmt = "chatml" if "messages" in raw else "tts"
    if fmt == "chatml":
        sample = dacite.from_dict(ChatMLSample, raw, config=dacite.Config(strict=True, check_types=True))
        if not sample.messages:
            raise ValueError("'messages' is empty")
        return sample
    return tts_to_chatml(raw, system_prompt)


def tts_to_chatml(raw: dict, system_prompt: str) -> ChatMLSample:
    """A TTS row -> the voice-cloning ChatMLSample. Keys beyond TTS_KEYS (`duration`, `id`, `emotion`, ...) are
    metadata: kept in `sample.misc`, never trained on; only the known keys must have their types."""
    for key in ("audio", "text"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"'{key}' must be a string")
    for key in TTS_KEYS - {"audio", "text"}:
        if key in raw and not isinstance(raw[key], str):
            raise ValueError(f"'{key}' must be a string, got {type(raw[key]).__name__}")
    if ("ref_audio" in raw) != ("ref_text" in raw):
        raise ValueError("'ref_audio' and 'ref_text' go together")
    messages = voice_cloning_prompt(raw["text"], system_prompt, raw.get("ref_text"), raw.get("ref_audio"))
    messages.append(Message("assistant", AudioContent(audio_url=raw["audio"])))
    metadata = {k: v for k, v in raw.items() if k not in TTS_KEYS - {"language"}}
    # Only the final assistant turn (the target audio) is trained; the reference turn is context.
    return ChatMLSample(messages=messages, start_index=len(messages) - 1, speaker=raw.get("speaker"),
                        misc=metadata or None)


def voice_cloning_prompt(text: str, system_prompt: str, ref_text: Optional[str] = None,
                         ref_audio: Optional[str] = None) -> list[Message]:
    """The turns before the audio to speak: system prompt, reference text + reference audio, the text. Training
    appends the target audio turn; generation (ds_train.generate) asks the model for it."""
    messages = [Message("system", system_prompt)] if system_prompt else []
    if ref_audio is not None:
        messages += [Message("user", ref_text), Message("assistant", AudioContent(audio_url=ref_audio))]
    return messages + [Message("user", text)]


def _resolve_audio(sample: ChatMLSample, base: Path) -> None:
    for content in audio_contents(sample):
        if content.raw_audio:
            raise ValueError("inline raw_audio is not supported; reference audio files by audio_url")
        if not content.audio_url:
            raise ValueError("AudioContent without audio_url")
        if not os.path.isabs(content.audio_url):  # also `shard.tar::KEY.flac`, a member of a relative file
            content.audio_url = os.path.normpath(base / content.audio_url)


def contents(message: Message) -> list:
    c = message.content
    return list(c) if isinstance(c, list) else [c]


def audio_contents(sample: ChatMLSample) -> list[AudioContent]:
    return [c for m in sample.messages for c in contents(m) if isinstance(c, AudioContent)]


def text_of(sample: ChatMLSample) -> list[str]:
    return [c if isinstance(c, str) else c.text for m in sample.messages for c in contents(m)
            if isinstance(c, (str, TextContent))]


def to_dict(sample: ChatMLSample) -> dict:
    return dataclasses.asdict(sample)


def tokenize(sample, text_tokenizer) -> Optional[tuple[list[int], list[int], bool]]:
    """(input_ids, label_ids, trains_audio) by boson's `prepare_chatml_sample`; None when it cannot tokenize."""
    from boson_multimodal.dataset.chatml_dataset import prepare_chatml_sample

    input_ids, label_ids, _, _ = prepare_chatml_sample(sample, text_tokenizer)
    if input_ids is None:
        return None
    audio_out = text_tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>")
    # The collator trains an audio-out segment only when its <|AUDIO_OUT|> token carries a label.
    trains_audio = any(t == audio_out and label >= 0 for t, label in zip(input_ids, label_ids))
    return input_ids, label_ids, trains_audio
