"""Character-level text for next-character prediction (the Shakespeare benchmarks).

The vocabulary is fixed, so ids mean the same thing in every dataset and run:

    id 0          PAD  padding; a target equal to PAD is not a prediction (mask it out)
    id 1          OOV  any character not listed below (tab, carriage return, non-ASCII)
    id 2          BOS  beginning of a snippet
    id 3          EOS  end of a snippet
    ids 4..99     the 96 characters of `CHARACTERS`, in that order: space, newline,
                  a-z, A-Z, 0-9 and the 32 ASCII punctuation marks

so `VOCAB_SIZE = 100`. A character is one Unicode code point (one item of a Python str).

Two converters turn text into fixed-length training sequences of T positions, inputs
`x` int32 [n, T] and per-position next-character targets `y` int32 [n, T], where
`y[i, t]` is the character that follows `x[i, t]` and PAD marks positions without a
target (a sequence task with `pad_id=PAD` leaves them out of the loss and accuracy):

  `snippets_to_sequences` (TensorFlow Federated style): a snippet s of L characters
  becomes the L + 2 ids `[BOS] + encode(s) + [EOS]`, cut into consecutive chunks of
  T + 1 ids, the last chunk padded with PAD, so a snippet gives ceil((L + 2) / (T + 1))
  sequences; each chunk c gives `x = c[:-1]`, `y = c[1:]`.

  `leaf_to_sequences` (LEAF style): a sample is an input string x (80 characters in
  LEAF) and its next character y. The ids of x + y (L + 1 of them) are cut to the last
  T + 1 when longer, then `x_ids = ids[:-1]`, `y_ids = ids[1:]`, left-aligned and padded
  with PAD to T. Every position predicts the next character, and the last real position
  predicts LEAF's label y. With T = 80 = L nothing is cut.
"""

from __future__ import annotations

import string
from typing import Sequence

import numpy as np

from fedjax_sim.errors import UserError

__all__ = [
    "BOS",
    "CHARACTERS",
    "EOS",
    "NUM_SPECIAL",
    "OOV",
    "PAD",
    "VOCAB_SIZE",
    "chunks_per_snippet",
    "decode",
    "encode",
    "leaf_to_sequences",
    "snippets_to_sequences",
]

PAD = 0
OOV = 1
BOS = 2
EOS = 3
NUM_SPECIAL = 4

# The characters with their own id, in id order starting at NUM_SPECIAL (all ASCII).
CHARACTERS = (" \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits
              + string.punctuation)
VOCAB_SIZE = NUM_SPECIAL + len(CHARACTERS)

# Code point -> id for the ASCII range; every other code point is OOV.
_ASCII_IDS = np.full(128, OOV, np.int32)
for _i, _c in enumerate(CHARACTERS):
    _ASCII_IDS[ord(_c)] = NUM_SPECIAL + _i
del _i, _c

# Id -> text for `decode`: PAD, BOS and EOS render as nothing, OOV as U+FFFD.
_GLYPHS = np.array(["", "\ufffd", "", ""] + list(CHARACTERS), dtype=object)

# Texts encoded per block, bounding the temporary arrays of the converters.
_BLOCK = 1 << 16


def encode(text: str) -> np.ndarray:
    """int32 [len(text)]: the id of every character of `text` (OOV when not in the vocabulary)."""
    if not isinstance(text, str):
        raise UserError(
            f"encode needs a str, got {type(text).__name__}; decode bytes with "
            f".decode('utf-8') first")
    # UTF-32 gives one 4-byte unit per code point, i.e. per item of the Python str.
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    ids = np.full(points.shape, OOV, np.int32)
    ascii_ = points < 128
    ids[ascii_] = _ASCII_IDS[points[ascii_]]
    return ids


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """The text of 1-D ids: PAD, BOS and EOS are left out, OOV shows as U+FFFD."""
    array = np.asarray(ids)
    if array.size == 0:
        return ""
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise UserError(
            f"decode needs a 1-D sequence of integer ids, got shape {array.shape} dtype "
            f"{array.dtype}; decode one sequence at a time")
    if array.min() < 0 or array.max() >= VOCAB_SIZE:
        raise UserError(
            f"ids must lie in [0, {VOCAB_SIZE}), got min {int(array.min())} max "
            f"{int(array.max())}; pass ids made by fedjax_sim.data.text.encode")
    return "".join(_GLYPHS[array].tolist())


def _check_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise UserError(f"seq_len must be an int >= 1, got {seq_len!r}; e.g. use 80")
    return int(seq_len)


def _check_strings(texts: Sequence[str], what: str) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise UserError(
                f"{what}[{i}] is a {type(text).__name__}, not a str; pass text (decode bytes "
                f"with .decode('utf-8'))")


def _encode_many(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids of all texts concatenated, int64 length of each text), with one encode call."""
    lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
    return encode("".join(texts)), lengths


def chunks_per_snippet(snippets: Sequence[str], seq_len: int = 80) -> np.ndarray:
    """int64 [len(snippets)]: sequences `snippets_to_sequences` makes of each snippet,
    ceil((L + 2) / (seq_len + 1)) for a snippet of L characters (always >= 1)."""
    t = _check_seq_len(seq_len)
    _check_strings(snippets, "snippets")
    lengths = np.fromiter((len(s) for s in snippets), np.int64, len(snippets))
    return (lengths + 2 + t) // (t + 1)


def snippets_to_sequences(
    snippets: Sequence[str], seq_len: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow Federated style sequences of whole snippets (see the module docstring).

    Args:
      snippets: n texts.
      seq_len: T, positions per sequence.

    Returns:
      `(x, y)`, int32 [M, T] each with M = sum(chunks_per_snippet(snippets, T)), the
      sequences of snippet 0 first, then snippet 1, and so on.
    """
    t = _check_seq_len(seq_len)
    counts = chunks_per_snippet(snippets, t)
    total = int(counts.sum())
    # Each snippet's chunks lie back to back in one zero (PAD) buffer of width T + 1.
    buffer = np.zeros(total * (t + 1), np.int32)
    bases = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) * (t + 1)
    for lo in range(0, len(snippets), _BLOCK):
        hi = min(lo + _BLOCK, len(snippets))
        flat, lengths = _encode_many(list(snippets[lo:hi]))
        base = bases[lo:hi]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        buffer[base] = BOS
        buffer[base + 1 + lengths] = EOS
        # Character k of snippet i goes to base_i + 1 + k, i.e. flat index + (base_i + 1 - start_i).
        buffer[np.repeat(base + 1 - starts, lengths) + np.arange(flat.size)] = flat
    chunks = buffer.reshape(total, t + 1)
    return np.ascontiguousarray(chunks[:, :-1]), np.ascontiguousarray(chunks[:, 1:])


def leaf_to_sequences(
    xs: Sequence[str], ys: Sequence[str], seq_len: int = 80
) -> tuple[np.ndarray, np.ndarray]:
    """LEAF style sequences of (input string, next character) samples (see the module docstring).

    Args:
      xs: n input strings.
      ys: n single characters, the character following each input.
      seq_len: T, positions per sequence.

    Returns:
      `(x, y)`, int32 [n, T] each.
    """
    t = _check_seq_len(seq_len)
    if len(xs) != len(ys):
        raise UserError(
            f"got {len(xs)} inputs but {len(ys)} next characters; give one y per x")
    _check_strings(xs, "x")
    _check_strings(ys, "y")
    for i, y in enumerate(ys):
        if len(y) != 1:
            raise UserError(
                f"y[{i}] is {y!r}, not a single character; LEAF's target is the one "
                f"character that follows x")
    n = len(xs)
    x_out = np.zeros((n, t), np.int32)
    y_out = np.zeros((n, t), np.int32)
    positions = np.arange(t, dtype=np.int64)[None, :]
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        flat, lengths = _encode_many([x + y for x, y in zip(xs[lo:hi], ys[lo:hi])])
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        window = np.minimum(lengths, t + 1)           # ids kept: the last T + 1 at most
        first = (starts + lengths - window)[:, None]  # flat index of the first kept id
        real = positions < (window - 1)[:, None]      # positions with an input and a target
        x_out[lo:hi] = np.where(real, flat[np.where(real, first + positions, 0)], PAD)
        y_out[lo:hi] = np.where(real, flat[np.where(real, first + positions + 1, 0)], PAD)
    return x_out, y_out
