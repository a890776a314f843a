"""The atomic writes of ``bench.provenance``: a failed or interrupted write leaves the destination as it was and
no temporary file behind, a full disk is an ``OSError`` naming the destination (also when the writer hides its
errno), and ``save_torch_atomic`` returns the size and SHA-256 of what it wrote."""

import errno
import os
import shutil

import pytest
import torch

from bench.provenance import save_torch_atomic, sha256_file, write_atomic


def test_write_atomic_cleans_up_and_names_the_destination(tmp_path, monkeypatch):
    target = tmp_path / "d" / "x.json"
    target.parent.mkdir()
    target.write_text("old")

    def failing(error):
        def write(tmp):
            tmp.write_text("half")
            raise error
        return write

    def wrapped(tmp):  # what torch.save does with the OSError of a Python file's write
        tmp.write_text("half")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    for write in (failing(OSError(errno.ENOSPC, "No space left on device")), wrapped,
                  failing(OSError(errno.EDQUOT, "Disk quota exceeded"))):
        with pytest.raises(OSError) as raised:
            write_atomic(target, write)
        assert raised.value.errno in (errno.ENOSPC, errno.EDQUOT) and raised.value.filename == str(target)
        assert os.listdir(target.parent) == ["x.json"] and target.read_text() == "old"
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, failing(KeyboardInterrupt()))
    assert os.listdir(target.parent) == ["x.json"]
    # a writer that hides the errno (torch.save to a path): ENOSPC when the file system is (nearly) full
    hidden = failing(RuntimeError("[enforce fail at inline_container.cc] file write failed"))
    with pytest.raises(RuntimeError):
        write_atomic(target, hidden)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(OSError) as raised:
        write_atomic(target, hidden)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert os.listdir(target.parent) == ["x.json"] and target.read_text() == "old"


def test_save_torch_atomic_returns_size_and_sha256(tmp_path):
    path = tmp_path / "s.pt"
    size, digest = save_torch_atomic(path, {"images": torch.ones(2, 1, 4, 4, dtype=torch.float16), "seeds": [0, 1]})
    assert size == path.stat().st_size and digest == sha256_file(path)
    assert torch.load(path, weights_only=True)["seeds"] == [0, 1]
