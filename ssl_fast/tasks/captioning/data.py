"""Caption data sets and their vocabulary.

A :class:`CaptionSet` holds images (in memory, or as files read on demand) with every reference
sentence of each image as a token list, and for the embedded scenes the true box of every digit.
:class:`Vocabulary` maps words to ids with the four special tokens ``<pad> <start> <end> <unk>``
(ids 0..3), as the Show-Attend-Tell reference implementations do.
"""
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

#: largest image set (uint8 bytes) whose resized files a CaptionSet keeps in memory
CACHE_BYTES = 2 << 30

#: a named object's true box in pixels: ``(word, (x0, y0, x1, y1))``, ends exclusive
Box = Tuple[str, Tuple[int, int, int, int]]


class Vocabulary:
    """Words <-> ids; ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then the words.

    Args:
        words: the vocabulary's words in id order (specials excluded).

    Example:
        >>> v = Vocabulary.build([["a", "3", "above", "a", "7"]], min_count=1)
        >>> v.decode(v.encode(["a", "7", "below", "a", "3"], max_len=8))
        ['a', '7', 'below', 'a', '3']
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        dup = [w for w, c in Counter(words).items() if c > 1 or w in SPECIALS]
        if dup:
            raise ValueError(f"words must be distinct and not special tokens, got {dup[:5]}")
        self.itos: List[str] = list(SPECIALS) + words
        self.stoi: Dict[str, int] = {w: i for i, w in enumerate(self.itos)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int = 1) -> "Vocabulary":
        """The words seen at least ``min_count`` times, most frequent first (ties alphabetical).

        Args:
            sentences: token lists (the training split's captions only).
            min_count: rarer words become ``<unk>``.
        """
        if not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
        counts = Counter(w for s in sentences for w in s)
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Sequence[str], max_len: int) -> List[int]:
        """``<start> w_1 .. w_n <end>`` as ids; sentences longer than ``max_len`` words are cut."""
        ids = [self.stoi.get(w, self.unk_id) for w in list(tokens)[:max_len]]
        return [self.start_id] + ids + [self.end_id]

    def decode(self, ids: Iterable[int]) -> List[str]:
        """Words up to the first ``<end>``, without ``<start>`` and ``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.itos[i])
        return out

    def batch(self, sentences: Sequence[Sequence[str]], max_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded ids ``[B, T]`` (``T`` = longest + 2) and lengths ``[B]`` (with start and end)."""
        enc = [self.encode(s, max_len) for s in sentences]
        lengths = torch.tensor([len(e) for e in enc], dtype=torch.int64)
        out = torch.full((len(enc), int(lengths.max()) if enc else 2), self.pad_id, dtype=torch.int64)
        for i, e in enumerate(enc):
            out[i, :len(e)] = torch.tensor(e, dtype=torch.int64)
        return out, lengths

    def state_dict(self) -> Dict[str, List[str]]:
        return {"itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: Dict[str, List[str]]) -> "Vocabulary":
        itos = list(state["itos"])
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary state must start with {SPECIALS}, got {itos[:4]}")
        return cls(itos[4:])


@dataclass
class CaptionSet:
    """Images with their reference captions.

    Either ``images`` (in memory) or ``paths`` (read on demand, resized to ``image_size``) is set.

    Attributes:
        references: per image, its reference sentences as token lists (at least one).
        images: ``[N, 3, H, W]`` float32 in [0, 1], or None.
        paths: image files, or None.
        image_size: side the files are resized to (``paths`` only).
        boxes: per image, the true box of every named object (embedded scenes), or None.
        name: short description for logs.
    """
    references: List[List[List[str]]]
    images: Optional[torch.Tensor] = None
    paths: Optional[List[str]] = None
    image_size: int = 0
    boxes: Optional[List[List[Box]]] = None
    name: str = ""
    _cache: Dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if (self.images is None) == (self.paths is None):
            raise ValueError("a CaptionSet needs exactly one of images and paths")
        n = len(self.images) if self.images is not None else len(self.paths)
        if len(self.references) != n:
            raise ValueError(f"references must have one entry per image ({n}), got {len(self.references)}")
        if any(len(r) == 0 for r in self.references):
            raise ValueError("every image needs at least one reference sentence")
        if self.images is not None and (self.images.dim() != 4 or self.images.shape[1] != 3):
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if self.paths is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 for images read from files, got {self.image_size}")
        if self.boxes is not None and len(self.boxes) != n:
            raise ValueError(f"boxes must have one entry per image ({n}), got {len(self.boxes)}")

    def __len__(self) -> int:
        return len(self.references)

    @property
    def side(self) -> int:
        """Image side in pixels."""
        return int(self.images.shape[-1]) if self.images is not None else self.image_size

    def get_images(self, idx: Sequence[int]) -> torch.Tensor:
        """Images ``[len(idx), 3, S, S]`` float32 in [0, 1]."""
        idx = [int(i) for i in idx]
        if self.images is not None:
            return self.images[idx]
        from ssl_fast.data.datasets import _read_image

        # resized images are kept as uint8 when the whole set fits in CACHE_BYTES (read once per run)
        cache = len(self.paths) * 3 * self.image_size ** 2 <= CACHE_BYTES
        out = []
        for i in idx:
            x = self._cache.get(i)
            if x is None:
                a = _read_image(self.paths[i])
                x = torch.as_tensor(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
                x = (x[0].clamp(0, 1) * 255).round().to(torch.uint8)
                if cache:
                    self._cache[i] = x
            out.append(x.float() / 255)
        return torch.stack(out) if out else torch.zeros(0, 3, self.image_size, self.image_size)

    def pairs(self) -> List[Tuple[int, int]]:
        """Every ``(image, sentence)`` pair: a training epoch visits each once."""
        return [(i, j) for i, refs in enumerate(self.references) for j in range(len(refs))]

    def channel_stats(self, limit: int = 2000) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel mean and std over (at most ``limit``, evenly spaced) images."""
        n = len(self)
        idx = np.linspace(0, n - 1, min(n, limit)).round().astype(int) if n else []
        x = self.get_images(idx).double()
        return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
