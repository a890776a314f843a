import torch

from bench.data import load_digits_split


def _keys(split):
    return [tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(split.images, split.labels, strict=True)]


def test_fixed_split_sizes_balance_and_ranges():
    splits = {s: load_digits_split(s) for s in ("train", "heldout", "heldout-a", "heldout-b", "all")}
    sizes = {s: len(d.images) for s, d in splits.items()}
    assert sizes == {"train": 1433, "heldout": 364, "heldout-a": 185, "heldout-b": 179, "all": 1797}
    assert splits["train"].images.shape[1:] == (1, 16, 16)
    for name, split in splits.items():
        assert split.images.min() >= -1.0 and split.images.max() <= 1.0, name
    assert torch.bincount(splits["heldout"].labels).tolist() == [36, 37, 36, 37, 37, 37, 37, 36, 35, 36]
    assert torch.bincount(splits["heldout-b"].labels).min() >= 17


def test_splits_partition_the_dataset():
    train, heldout, a, b, everything = (
        _keys(load_digits_split(s)) for s in ("train", "heldout", "heldout-a", "heldout-b", "all"))
    assert sorted(train + heldout) == sorted(everything)
    assert sorted(a + b) == sorted(heldout)


def test_split_is_deterministic():
    a, b = load_digits_split("heldout"), load_digits_split("heldout")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
