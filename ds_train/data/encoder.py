"""Pass 2's audio: the codes of the clips of one rank's part of a round (prepare.py).

Decoding and resampling run in this process or, with `data.decode_workers` > 0, in worker processes (a torch
DataLoader over the part's clips) while this process encodes, on the device the rank is bound to. The audio
tokenizer takes one clip per call (`data.encode_batch=1`, the default: the codes the serve engine conditions on) or,
with `data.encode_batch=N`, N clips of similar length padded to a common length, which changes codes
(audio.encode_padded). Codes of recent
clips are remembered across parts: a speaker's reference is shared by many records.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ds_train.data.audio import AudioError, encode, encode_padded, load_audio

CLIP_MEMO = 1024  # clips whose codes are remembered from one part to the next
GROUP_WINDOW = 8  # encode_batch > 1: decoded clips are sorted by length this many batches at a time


def encode_clip(path: str, audio_tokenizer, loudness_normalize: bool) -> torch.Tensor:
    """Decode, downmix, resample, encode: codes (n_q, T) as int16 (codes < 1024 fit; a quarter of int64's bytes)."""
    wav = load_audio(path, audio_tokenizer.sampling_rate)
    return encode(audio_tokenizer, wav, loudness_normalize).to(torch.int16)


class ClipCodes:
    """`encode(paths)` the clips of a part, then `clips(path)` is a clip's codes (or raises its AudioError)."""

    def __init__(self, audio_tokenizer, loudness_normalize: bool, workers: int = 0, batch: int = 1):
        self.tokenizer, self.loudness_normalize = audio_tokenizer, loudness_normalize
        self.workers, self.batch = workers, batch
        self.memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # the CLIP_MEMO most recently used
        self.part: dict[str, torch.Tensor | str] = {}  # this part's clips: codes, or why the clip failed to decode

    def encode(self, paths: Iterable[str]) -> None:
        """Encode each clip of `paths` not remembered, decoded ahead by the workers, in order (batched: in groups of
        similar length)."""
        self.part, todo = {}, []
        for path in dict.fromkeys(paths):
            if path in self.memo:
                self.part[path] = self._keep(path, self.memo[path])
            else:
                todo.append(path)
        if not todo:
            return
        decoded = DataLoader(_Decode(todo, self.tokenizer.sampling_rate), batch_size=None, collate_fn=_as_is,
                             num_workers=min(self.workers, len(todo)))
        window = []
        for path, wav, error in decoded:
            if error is not None:
                self.part[path] = error
            elif self.batch == 1:
                self.part[path] = self._keep(path, encode(self.tokenizer, wav, self.loudness_normalize))
            else:
                window.append((path, wav))
                if len(window) == self.batch * GROUP_WINDOW:
                    self._encode_grouped(window)
                    window = []
        self._encode_grouped(window)

    def __call__(self, path: str) -> torch.Tensor:
        got = self.part.get(path)
        if got is None:  # not part of the last encode(): on its own
            got = self._keep(path, encode_clip(path, self.tokenizer, self.loudness_normalize))
        if isinstance(got, str):
            raise AudioError(got)
        return got

    def _encode_grouped(self, clips: list[tuple[str, np.ndarray]]) -> None:
        clips = sorted(clips, key=lambda c: len(c[1]))
        for i in range(0, len(clips), self.batch):
            group = clips[i:i + self.batch]
            codes = encode_padded(self.tokenizer, [wav for _, wav in group], self.loudness_normalize)
            for (path, _), c in zip(group, codes):
                self.part[path] = self._keep(path, c)

    def _keep(self, path: str, codes: torch.Tensor) -> torch.Tensor:
        codes = codes.to(torch.int16)
        self.memo[path] = codes
        self.memo.move_to_end(path)
        while len(self.memo) > CLIP_MEMO:
            self.memo.popitem(last=False)
        return codes


class _Decode(Dataset):
    """(path, samples at the tokenizer's rate, None), or (path, None, why it cannot be decoded): a clip that changed
    since pass 1 checked it is reported with the rest, not a crash of the worker."""

    def __init__(self, paths: list[str], rate: int):
        self.paths, self.rate = paths, rate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return self.paths[i], load_audio(self.paths[i], self.rate), None
        except AudioError as e:
            return self.paths[i], None, str(e)


def _as_is(item):
    return item  # the default collate would turn the samples into tensors
