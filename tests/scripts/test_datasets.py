"""scripts/_datasets.py against the real Debian files (dataset-fashion-mnist, fortunes)."""
import gzip
import os

import pytest
import torch

import _datasets as datasets  # scripts/, on sys.path through tests/conftest.py


@pytest.fixture(scope="module")
def fmnist_train():
    return datasets.fashion_mnist("train")


@pytest.fixture(scope="module")
def fort():
    return datasets.fortunes()


# ---------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist_train_shapes_labels_and_normalisation(fmnist_train):
    x, y = fmnist_train
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert torch.equal(y.bincount(), torch.full((10,), 6000))
    assert y[:3].tolist() == [9, 0, 0]  # ankle boot, T-shirt, T-shirt: the file's first labels
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-3


def test_fashion_mnist_test_split_flatten_and_raw_pixels():
    x, y = datasets.fashion_mnist("test", flatten=True, normalize=False)
    assert x.shape == (10000, 784) and y.shape == (10000,)
    assert torch.equal(y.bincount(), torch.full((10,), 1000))
    assert x.min().item() == 0.0 and x.max().item() == 1.0
    # raw pixels are k / 255
    assert torch.allclose(x[0] * 255, (x[0] * 255).round(), atol=1e-4)


def test_fashion_mnist_normalised_is_affine_of_raw():
    raw, _ = datasets.fashion_mnist("test", normalize=False)
    norm, _ = datasets.fashion_mnist("test")
    expect = (raw - datasets.FASHION_MNIST_MEAN) / datasets.FASHION_MNIST_STD
    assert torch.allclose(norm, expect, atol=1e-5)


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist("train", root=str(tmp_path))


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        datasets.fashion_mnist("validation")


def test_fashion_mnist_corrupt_file_is_reported(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + b"\x00" * 20)
    with pytest.raises(ValueError, match="magic"):
        datasets.fashion_mnist("test", root=str(tmp_path))


def test_fashion_mnist_truncated_file_is_reported(tmp_path):
    src = datasets.FASHION_MNIST_ROOT
    with gzip.open(os.path.join(src, "t10k-images-idx3-ubyte.gz")) as f:
        images = f.read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
        f.write(images[:-100])
    with gzip.open(os.path.join(src, "t10k-labels-idx1-ubyte.gz")) as f, \
            gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb", compresslevel=1) as g:
        g.write(f.read())
    with pytest.raises(ValueError, match="reinstall"):
        datasets.fashion_mnist("test", root=str(tmp_path))


# ---------------------------------------------------------------------- fortunes
def test_fortunes_default_categories_and_split_sizes(fort):
    assert fort.categories == datasets.DEFAULT_8 and len(fort.categories) >= 6
    assert fort.train_labels.dtype == torch.int64 and fort.test_labels.dtype == torch.int64
    assert len(fort.train_texts) == len(fort.train_labels) and len(fort.test_texts) == len(fort.test_labels)
    train_counts = fort.train_labels.bincount(minlength=8)
    test_counts = fort.test_labels.bincount(minlength=8)
    for label, cat in enumerate(fort.categories):
        total = len(datasets.read_fortunes(os.path.join(datasets.FORTUNES_ROOT, cat)))
        assert total > 300, cat
        assert train_counts[label] + test_counts[label] == total
        assert test_counts[label] == round(0.2 * total)


def test_fortunes_texts_are_clean_entries(fort):
    texts = fort.train_texts + fort.test_texts
    assert all(t and t == t.strip() for t in texts)
    assert not any(line.strip() == "%" for t in texts for line in t.splitlines())
    assert not any("\x08" in t for t in texts)
    # overstruck emphasis in the computers file ("*____<BS><BS><BS><BS>knew*") reads as the word
    assert any("I *knew* I had some reason" in t for t in texts)


def test_fortunes_text_is_labelled_by_its_file(fort):
    computers = set(datasets.read_fortunes(os.path.join(datasets.FORTUNES_ROOT, "computers")))
    label = fort.categories.index("computers")
    mine = [t for t, y in zip(fort.train_texts, fort.train_labels.tolist()) if y == label]
    assert mine and all(t in computers for t in mine)


def test_fortunes_split_is_fixed_and_disjoint(fort):
    again = datasets.fortunes()
    assert again.test_texts == fort.test_texts and torch.equal(again.test_labels, fort.test_labels)
    assert again.train_texts == fort.train_texts
    for label in range(len(fort.categories)):
        tr = {t for t, y in zip(fort.train_texts, fort.train_labels.tolist()) if y == label}
        te = {t for t, y in zip(fort.test_texts, fort.test_labels.tolist()) if y == label}
        # the files hold a few verbatim duplicates; nearly all test texts are unseen
        assert len(te - tr) >= 0.97 * len(te)


def test_fortunes_split_of_a_category_does_not_depend_on_the_others(fort):
    sub = datasets.fortunes(categories=("science", "work"))
    full_science = [t for t, y in zip(fort.test_texts, fort.test_labels.tolist())
                    if y == fort.categories.index("science")]
    sub_science = [t for t, y in zip(sub.test_texts, sub.test_labels.tolist()) if y == 0]
    assert sub_science == full_science
    assert sub.categories == ("science", "work") and set(sub.test_labels.tolist()) == {0, 1}


def test_fortunes_seed_changes_the_split(fort):
    other = datasets.fortunes(seed=1)
    assert other.test_texts != fort.test_texts
    assert len(other.test_texts) == len(fort.test_texts)


def test_fortune_categories_skip_indexes_and_links():
    cats = datasets.fortune_categories()
    assert set(datasets.DEFAULT_8) <= set(cats)
    assert not any(c.endswith((".dat", ".u8")) for c in cats)


def test_fortunes_bad_arguments():
    with pytest.raises(ValueError, match="available: .*computers"):
        datasets.fortunes(categories=("computers", "no-such-category"))
    with pytest.raises(ValueError, match="at least 2"):
        datasets.fortunes(categories=("computers",))
    with pytest.raises(ValueError, match="test_fraction"):
        datasets.fortunes(test_fraction=1.0)


def test_fortunes_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        datasets.fortunes(root=str(tmp_path / "nothing"))


def test_read_fortunes_parses_separators_and_backspaces(tmp_path):
    path = tmp_path / "mini"
    path.write_text("first\n  line two\n%\n\n%\nb\x08bold and _\x08x\n%\nlast", encoding="utf-8")
    assert datasets.read_fortunes(str(path)) == ["first\n  line two", "bold and x", "last"]


# ---------------------------------------------------------------------- shard
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_is_disjoint_equal_and_covers(world_size):
    x = torch.arange(103)
    y = torch.arange(103) * 10
    parts = [datasets.shard((x, y), world_size, r) for r in range(world_size)]
    per = 103 // world_size
    assert all(len(px) == per and torch.equal(py, px * 10) for px, py in parts)
    seen = torch.cat([px for px, _ in parts]).sort().values
    assert torch.equal(seen, torch.arange(per * world_size))


def test_shard_single_tensor_and_list():
    assert torch.equal(datasets.shard(torch.arange(10), 2, 1), torch.tensor([1, 3, 5, 7, 9]))
    assert datasets.shard(list("abcdef"), 3, 2) == ["c", "f"]


def test_shard_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        datasets.shard(torch.arange(10), 2, 2)
    with pytest.raises(ValueError, match="different lengths"):
        datasets.shard((torch.arange(10), torch.arange(9)), 2, 0)
    with pytest.raises(ValueError, match="cannot give"):
        datasets.shard(torch.arange(3), 4, 0)
