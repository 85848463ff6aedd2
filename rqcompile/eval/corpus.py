"""Deterministic text every machine has, as token ids: no dataset download is possible here.

- `license_corpus`: the license texts under /usr/share/common-licenses, the *evaluation* text (English prose).
- `stdlib_corpus`: Python standard-library sources, the *calibration* text (kept apart from evaluation so a
  calibrated cache is never scored on what it was fitted to).

Files are read in sorted order and joined with blank lines; the token ids are the first `n_tokens` after `offset`.
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch

LICENSE_DIR = Path("/usr/share/common-licenses")

# Long-lived stdlib modules (present in 3.10 - 3.14), sorted. A fixed list rather than a glob, so the text does not
# shift when a Python release adds or drops a module; file contents may still differ slightly between versions.
STDLIB_FILES = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "bisect.py",
    "calendar.py",
    "collections/__init__.py",
    "contextlib.py",
    "copy.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "fractions.py",
    "functools.py",
    "heapq.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "shutil.py",
    "statistics.py",
    "textwrap.py",
    "typing.py",
)


def _license_files() -> list[Path]:
    """Regular files only: the symlinks (GPL -> GPL-3, ...) would repeat whole texts."""
    if not LICENSE_DIR.is_dir():
        raise FileNotFoundError(f"{LICENSE_DIR} is missing (Debian/Ubuntu package base-files provides it)")
    return sorted(p for p in LICENSE_DIR.iterdir() if p.is_file() and not p.is_symlink())


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in STDLIB_FILES if (root / name).is_file()]
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return files


@functools.lru_cache(maxsize=8)
def _read(paths: tuple[Path, ...]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)


def license_text() -> str:
    """All license texts, sorted by file name, joined with blank lines."""
    return _read(tuple(_license_files()))


def stdlib_text() -> str:
    """The fixed standard-library files, in `STDLIB_FILES` order, joined with blank lines."""
    return _read(tuple(_stdlib_files()))


_SEAM_MARGIN = 64


def _tokens(tokenizer, paths: Iterable[Path], n_tokens: int, offset: int) -> torch.Tensor:
    """First `n_tokens` ids after `offset` of the joined files, tokenizing file by file only as far as needed."""
    need = offset + n_tokens
    pieces: list[str] = []
    ids: list[int] = []
    for p in paths:
        pieces.append(p.read_text(encoding="utf-8", errors="replace"))
        # Tokenize the joined prefix; text appended later can only re-split the last few tokens before the seam,
        # so a margin makes the result identical to tokenizing all files at once.
        ids = tokenizer("\n\n".join(pieces), add_special_tokens=False)["input_ids"]
        if len(ids) >= need + _SEAM_MARGIN:
            break
    if len(ids) < need:
        raise ValueError(f"corpus has only {len(ids)} tokens, {need} requested (offset {offset} + n_tokens {n_tokens})")
    return torch.tensor([ids[offset:need]], dtype=torch.long)


def license_corpus(tokenizer, n_tokens: int = 1025, offset: int = 0) -> torch.Tensor:
    """Evaluation token ids `[1, n_tokens]` from the license texts (1025 = prefill 512 + 512 decode steps + 1)."""
    return _tokens(tokenizer, _license_files(), n_tokens, offset)


def stdlib_corpus(tokenizer, n_tokens: int = 1025, offset: int = 0) -> torch.Tensor:
    """Calibration token ids `[1, n_tokens]` from Python standard-library sources."""
    return _tokens(tokenizer, _stdlib_files(), n_tokens, offset)
