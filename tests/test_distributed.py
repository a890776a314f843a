"""Scale-out: torchrun sharding over gloo on CPU (a full disk on one rank stops every rank), and the submitit
launcher with its local executor.

Sample files must not depend on how many processes made them: chunk k of a cell is always
seeds[k*B:(k+1)*B], so even batch-dependent (tensor- and channel-wise) activation scales see the same
batches. Each run is a real subprocess (``torchrun`` / submitit's local executor), as a user runs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GRANULARITIES = ("tensor", "sample", "channel", "sample-channel")

# 10 seeds in batches of 4: chunks of 4, 4 and 2, so the ranks get unequal shares (2 chunks and 1)
MATRIX = """
[run]
model = "digits"
sampler = "ddim-quad"
steps = 3
n_samples = 10
batch_size = 4
seed = 7
metrics = ["psnr_to_fp"]
[[matrix]]
w_bits = [8]
a_bits = [4]
base = ["dynamic"]
a_granularity = ["tensor", "sample", "channel", "sample-channel"]
modulation = ["off", "ec"]
[[matrix]]
base = ["fp"]
"""


def _env() -> dict[str, str]:
    # one thread per process in every run, so a kernel sums in the same order whoever runs it
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(out: Path) -> dict[str, torch.Tensor]:
    table = pd.read_csv(out / "results.csv")
    assert (table["status"] == "ok").all(), table[["method", "status", "error"]]
    return {row.cell_id: torch.load(out / row.samples_file, weights_only=True)["images"]
            for row in table.itertuples()}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dist")
    (folder / "m.toml").write_text(MATRIX)
    out = folder / "one"
    subprocess.run([sys.executable, "-m", "bench", "run", str(folder / "m.toml"), "--out", str(out), "--device",
                    "cpu", "--no-progress"], check=True, env=_env(), cwd=folder, capture_output=True, timeout=600)
    return folder, out


def test_two_gloo_processes_write_the_same_samples_as_one(single):
    folder, one = single
    two = folder / "two"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "-m", "bench", "run", str(folder / "m.toml"), "--out", str(two),
         "--device", "cpu", "--no-progress"],
        env=_env(), cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _samples(one), _samples(two)
    assert set(a) == set(b) and len(a) == 1 + 2 * len(GRANULARITIES)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise, every granularity, with and without MoDiff
    table_one, table_two = (pd.read_csv(d / "results.csv").set_index("cell_id") for d in (one, two))
    assert set(table_one["world_size"]) == {1} and set(table_two["world_size"]) == {2}
    assert set(table_two["a_granularity"]) == {*GRANULARITIES, "none"}
    pd.testing.assert_series_equal(table_one["psnr_to_fp"], table_two["psnr_to_fp"].loc[table_one.index])
    # chunks were removed after assembly; rank 0 alone wrote the tables and run.json
    assert not list(two.glob("cells/*/chunks")) and not list(two.glob("reference/*.chunks"))
    invocations = json.loads((two / "run.json").read_text())["invocations"]
    assert [i["world_size"] for i in invocations] == [2]
    # the chunking really gave the ranks different shares: the batch-wise cells differ from a run in
    # one batch of 10, which proves the comparison above would see a batch-composition change
    assert "--- " not in result.stdout


def test_a_user_mistake_under_torchrun_stops_every_rank_with_one_line(single, tmp_path):
    """Rank 0 finds the output directory holds another matrix: every rank must exit (status 2), none
    may be left waiting in a collective."""
    folder, one = single
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "-m", "bench", "run", str(folder / "m.toml"), "--out", str(one),
         "--device", "cpu", "--no-progress", "--set", "run.n_samples=3"],
        env=_env(), cwd=folder, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    # one message per rank (the two ranks write at once, so their lines may interleave)
    assert result.stderr.count("modiff-bench: error:") == 2
    assert result.stderr.count("holds results of a different matrix") == 2


def test_batch_composition_matters_so_the_invariance_is_not_vacuous(single, tmp_path):
    """With tensor-wise scales, batches of 5 instead of 4 change the samples: the equality above is
    a property of the fixed chunking, not of a quantizer that ignores the batch."""
    folder, one = single
    other = tmp_path / "b5"
    subprocess.run([sys.executable, "-m", "bench", "run", str(folder / "m.toml"), "--out", str(other), "--device",
                    "cpu", "--no-progress", "--set", "run.batch_size=5", "--set", 'matrix.a_granularity=["tensor"]',
                    "--set", 'matrix.modulation=["off"]'], check=True, env=_env(), cwd=folder, capture_output=True,
                   timeout=600)
    by_method = {}
    for out in (one, other):
        table = pd.read_csv(out / "results.csv")
        row = table[(table["a_granularity"] == "tensor") & (table["modulation"] == "off")].iloc[0]
        by_method[out] = torch.load(out / row.samples_file, weights_only=True)["images"]
    assert not torch.equal(by_method[one], by_method[other])


def test_submitit_local_executor_runs_the_matrix_as_an_array(single, tmp_path):
    pytest.importorskip("submitit")
    folder, one = single
    out = tmp_path / "array"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", str(folder / "m.toml"), "--out", str(out), "--device", "cpu",
         "--launcher", "submitit", "--submitit-cluster", "local", "--cells-per-task", "4", "--wait"],
        env=_env(), cwd=folder, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "submitted 3 task(s) for 9 cell(s)" in result.stdout
    a, b = _samples(one), _samples(out)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    invocations = json.loads((out / "run.json").read_text())["invocations"]
    task_cells = [set(i["cells"]) for i in invocations if i["cells"] is not None]
    assert len(task_cells) == 3 and set().union(*task_cells) == set(a)  # each task ran its own share
    # a second submission finds nothing to do
    again = subprocess.run(
        [sys.executable, "-m", "bench", "run", str(folder / "m.toml"), "--out", str(out), "--device", "cpu",
         "--launcher", "submitit", "--submitit-cluster", "local"],
        env=_env(), cwd=folder, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def test_submitit_launcher_needs_a_partition_on_slurm(single, capsys):
    from bench.cli import main

    folder, _ = single
    code = main(["run", str(folder / "m.toml"), "--out", str(folder / "x"), "--launcher", "submitit",
                 "--submitit-cluster", "slurm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--slurm-partition" in err[0]


# a plugin every torchrun rank imports (run.imports): on the rank named by the environment, writing a
# chunk fails with ENOSPC
FULL_DISK_PLUGIN = """
import errno, os
import torch

_save = torch.save

def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "tag" in obj and os.environ.get("FULL_DISK_RANK") == os.environ.get("RANK"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _save(obj, f, *args, **kwargs)

torch.save = save
"""


DISTRIBUTED_MATRIX = """
[run]
steps = 3
n_samples = 8
batch_size = 4
metrics = ["psnr_to_fp"]
imports = ["full_disk.py"]
[matrix]
base = ["fp", "dynamic"]
a_bits = [4]
a_granularity = ["sample"]
"""


def test_a_full_disk_on_one_torchrun_rank_stops_every_rank(tmp_path):
    """Rank 1 cannot write its chunk: both ranks stop with the one line (none waits in a collective for
    the other), no cell is recorded failed, and the rerun completes."""
    import socket
    import subprocess
    import sys

    (tmp_path / "full_disk.py").write_text(FULL_DISK_PLUGIN)
    (tmp_path / "m.toml").write_text(DISTRIBUTED_MATRIX)
    out = tmp_path / "o"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def torchrun(**extra_env):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
             f"--master_port={port}", "-m", "bench", "run", str(tmp_path / "m.toml"), "--out", str(out),
             "--device", "cpu", "--no-progress"],
            env={**env, **extra_env}, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    failed = torchrun(FULL_DISK_RANK="1")
    assert failed.returncode != 0
    assert failed.stderr.count("modiff-bench: error: no space left on device while writing") == 2, failed.stderr
    assert "chunk-000001.pt" in failed.stderr  # (torchrun adds a traceback of its own about the failed workers)
    assert not list(out.glob("cells/*/result.json")) and not list(out.rglob(".tmp-*"))
    done = torchrun()
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2 and (table.status == "ok").all() and (table.world_size == 2).all()
