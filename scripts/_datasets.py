"""The data sets of the demo, benchmarks and tests, read from Debian packages (no download).

A helper of scripts/ (on ``sys.path``), not part of the taciturn package: the library trains on
whatever data its user has. Named ``_datasets`` so that it does not shadow Hugging Face's
``datasets`` package for the scripts and tests that put scripts/ first on ``sys.path``.

``fashion_mnist(split)``: Fashion-MNIST from ``apt-get install dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist), as normalised float images and int64 labels.
``fortunes()``: short texts from ``apt-get install fortunes`` (/usr/share/games/fortunes), one
class per category file, with a fixed held-out split.
``shard(tensors, world_size, rank)``: one rank's disjoint, equal-sized part of a data set.
"""
from __future__ import annotations

import gzip
import os
import random
import re
from typing import List, NamedTuple, Sequence, Tuple, Union

import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
#: mean and standard deviation of the training images' pixels in [0, 1]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FASHION_FILES = {"train": "train", "test": "t10k"}

FORTUNES_ROOT = "/usr/share/games/fortunes"
DEFAULT_8 = ("computers", "cookie", "definitions", "people", "politics", "science", "songs-poems", "work")
_OVERSTRIKE = re.compile(r"[^\x08\n]\x08")


def _read_idx(path: str, magic: int, ndim: int) -> torch.Tensor:
    """An IDX file (big-endian header: magic, then one int32 per dimension, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    head = [int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(1 + ndim)]
    if head[0] != magic:
        raise ValueError(f"{path}: not an IDX file of {ndim} dimension(s) (magic {head[0]:#x}, expected {magic:#x}); "
                         "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`")
    shape = head[1:]
    body = raw[4 * (1 + ndim):]
    expected = 1
    for d in shape:
        expected *= d
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but holds {len(body)} bytes; reinstall it "
                         "with `apt-get install --reinstall dataset-fashion-mnist`")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*shape)


def fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT, flatten: bool = False,
                  normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` (``"train"``: 60000 images, ``"test"``: 10000) as ``(images, labels)``.

    ``images``: float32 ``(N, 1, 28, 28)`` (``(N, 784)`` with ``flatten=True``), pixels scaled to
    [0, 1] then standardised with the training set's mean and std (``normalize=False`` keeps
    [0, 1]). ``labels``: int64 ``(N,)`` in 0..9, names in ``FASHION_MNIST_CLASSES``.
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    stem = _FASHION_FILES[split]
    paths = [os.path.join(root, f"{stem}-images-idx3-ubyte.gz"), os.path.join(root, f"{stem}-labels-idx1-ubyte.gz")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found ({', '.join(missing)} missing): install it with "
                                "`apt-get install dataset-fashion-mnist` (or run scripts/install_deps.sh)")
    images = _read_idx(paths[0], 0x803, 3)
    labels = _read_idx(paths[1], 0x801, 1).long()
    if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
        raise ValueError(f"{root}: {tuple(images.shape)} images vs {tuple(labels.shape)} labels; expected "
                         "(N, 28, 28) and (N,): reinstall with `apt-get install --reinstall dataset-fashion-mnist`")
    x = images.float().div_(255.0)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    x = x.view(-1, 784) if flatten else x.unsqueeze(1)
    return x, labels


class TextSplit(NamedTuple):
    """A text classification data set: texts, int64 labels, and the class names (label i is
    ``categories[i]``)."""

    train_texts: List[str]
    train_labels: torch.Tensor
    test_texts: List[str]
    test_labels: torch.Tensor
    categories: Tuple[str, ...]


def read_fortunes(path: str) -> List[str]:
    """The entries of one fortune file (separated by lines holding only ``%``), stripped, with
    terminal overstriking (backspaces) resolved; empty entries dropped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    cleaned = (_strip_overstrike(e).strip() for e in entries)
    return [e for e in cleaned if e]


def _strip_overstrike(text: str) -> str:
    """What a terminal shows for ``text`` typed with backspaces: ``a<BS>b`` is ``b``, and
    ``____<BS><BS><BS><BS>word`` (underlining) is ``word``."""
    while True:
        shorter = _OVERSTRIKE.sub("", text)
        if shorter == text:
            return text.replace("\x08", "")
        text = shorter


def fortune_categories(root: str = FORTUNES_ROOT) -> List[str]:
    """The category files under ``root`` (skipping the ``.dat`` indexes, the ``.u8`` links and folders)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no fortunes at {root}: install them with `apt-get install fortunes` (or run "
                                "scripts/install_deps.sh)")
    return sorted(n for n in os.listdir(root)
                  if not n.endswith((".dat", ".u8")) and os.path.isfile(os.path.join(root, n)))


def fortunes(categories: Sequence[str] = DEFAULT_8, root: str = FORTUNES_ROOT, seed: int = 0,
             test_fraction: float = 0.2) -> TextSplit:
    """Fortune-cookie texts labelled by their category file, split into train and test.

    The split is fixed: each category's entries are shuffled by a generator seeded with
    ``(seed, category)`` and the first ``round(test_fraction * count)`` are the test set, so a
    category's split does not depend on which other categories are asked for. Texts keep the
    category order, then the file order within a part.
    """
    categories = tuple(categories)
    if len(categories) < 2 or len(set(categories)) != len(categories):
        raise ValueError(f"categories={categories!r}: give at least 2 distinct category names, e.g. DEFAULT_8")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must be in (0, 1), e.g. 0.2")
    available = fortune_categories(root)
    unknown = [c for c in categories if c not in available]
    if unknown:
        raise ValueError(f"unknown fortune categories {unknown} in {root}; available: {', '.join(available)} "
                         "(the full set comes with `apt-get install fortunes`)")
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    for label, cat in enumerate(categories):
        entries = read_fortunes(os.path.join(root, cat))
        order = list(range(len(entries)))
        random.Random(f"{seed}:{cat}").shuffle(order)
        n_test = round(test_fraction * len(entries))
        if n_test == 0 or n_test == len(entries):
            raise ValueError(f"category {cat!r} has {len(entries)} entries: too few to hold out "
                             f"test_fraction={test_fraction}")
        held = set(order[:n_test])
        for i, text in enumerate(entries):
            if i in held:
                test_texts.append(text)
                test_labels.append(label)
            else:
                train_texts.append(text)
                train_labels.append(label)
    return TextSplit(train_texts, torch.tensor(train_labels, dtype=torch.int64), test_texts,
                     torch.tensor(test_labels, dtype=torch.int64), categories)


def shard(data: Union[torch.Tensor, Sequence], world_size: int, rank: int):
    """Rank ``rank``'s part of ``data`` (a tensor, a list, or a tuple of them with equal
    lengths): every ``world_size``-th sample from ``rank`` on, after dropping the tail so every
    rank gets the same count (equal steps per epoch). Parts are disjoint and cover the rest.
    A tuple in gives a tuple out."""
    if not isinstance(world_size, int) or world_size < 1 or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need ints with 0 <= rank < world_size")
    parts = data if isinstance(data, tuple) else (data,)
    lengths = {len(p) for p in parts}
    if len(lengths) != 1:
        raise ValueError(f"shard: the parts have different lengths {sorted(lengths)}; pass (inputs, labels) of "
                         "the same data set")
    per_rank = lengths.pop() // world_size
    if per_rank == 0:
        raise ValueError(f"shard: {len(parts[0])} samples cannot give each of {world_size} ranks one")
    out = tuple(p[rank:per_rank * world_size:world_size] for p in parts)
    return out if isinstance(data, tuple) else out[0]
