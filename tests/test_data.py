import collections
import hashlib
import json

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


def test_each_split_is_the_documented_ranks_of_each_class_in_dataset_order():
    """bench.data's rule, recomputed here from scikit-learn's labels alone: an image's split depends only on its
    rank within its class in dataset order. Rank % 5 == 0 is held out, the rest is train; the held-out images of a
    class are cut the same way into halves, so 'heldout-a' is rank % 10 == 0 and 'heldout-b' rank % 10 == 5. Each
    split must be exactly those images of 'all', in dataset order; the held-out indices are also pinned, so a
    reordered or changed scikit-learn dataset (which would silently move images between the splits) fails too."""
    from sklearn.datasets import load_digits

    target = load_digits().target.tolist()
    seen: collections.Counter = collections.Counter()
    ranks = []
    for label in target:
        ranks.append(seen[label])
        seen[label] += 1
    want = {
        "train": [i for i, r in enumerate(ranks) if r % 5 != 0],
        "heldout": [i for i, r in enumerate(ranks) if r % 5 == 0],
        "heldout-a": [i for i, r in enumerate(ranks) if r % 10 == 0],
        "heldout-b": [i for i, r in enumerate(ranks) if r % 10 == 5],
        "all": list(range(len(target))),
    }
    everything = load_digits_split("all")
    assert everything.labels.tolist() == target
    for name, indices in want.items():
        split = load_digits_split(name)
        assert torch.equal(split.labels, everything.labels[indices]), name
        assert torch.equal(split.images, everything.images[indices]), name
    assert want["heldout"][:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 35, 39]  # the first image of every class, ...
    assert hashlib.sha256(json.dumps(want["heldout"]).encode()).hexdigest() == (
        "c392c2c337d59b2948fbb58058597a5283d35d64005146e337a314caf69ebb9a")
