"""Resolving a cell and building it (``bench.build``): each cell is resolved once, without changing what it was
given, into a frozen record that every later step reads; the base's ``ModiffConfig`` is made once per cell; and
``benchmarks/`` builds its configurations on that same path."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from bench.build import ResolvedCell, build, resolve_cell
from bench.cell import CellSpec
from bench.matrix import cell_id, load_matrix
from bench.matrix_file import presets
from bench.quantizers import DynamicQuantizer
from bench.registry import BaseQuantizer
from bench.runner import Runner

ROOT = Path(__file__).resolve().parent.parent


def _cell(**kw) -> CellSpec:
    fields = {"model": "digits", "checkpoint": None, "sampler": "ddim-quad", "steps": 3, "eta": 0.0, "n_samples": 4,
              "seed": 0, "batch_size": 4, "base": "lcq", "modulation": "ec", "cache": "none", "w_bits": 8,
              "a_bits": 4, "a_granularity": "auto"}
    return CellSpec(**{**fields, **kw})


def test_resolving_leaves_the_cell_as_given_and_is_frozen():
    cell = _cell()
    given = dataclasses.replace(cell)
    resolved = resolve_cell(cell)
    assert cell == given  # nothing changed in place (the earlier resolve set a_granularity on the cell it got)
    assert resolved.skip is None and resolved.spec.a_granularity == "channel" and resolved.spec is not cell
    assert resolved.config.granularity == "channel" and resolved.sampler.steps == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.skip = "changed"  # type: ignore[misc]
    skipped = resolve_cell(_cell(base="ltq", a_granularity="channel"))
    assert skipped.base is None and skipped.config is None and "tensor-wise by definition" in skipped.skip


def test_a_resolved_cell_resolves_to_itself_for_every_preset():
    """Reading a run directory back (its cells as recorded) resolves each cell to the same settings and id."""
    for name in presets():
        for cell in load_matrix(name).cells:
            again = resolve_cell(cell)
            assert again.skip is None and again.spec == cell and cell_id(again.spec) == cell_id(cell), (name, cell)


def test_each_cell_is_resolved_once_and_its_config_made_once(tmp_path, monkeypatch):
    """``configure`` (the ModiffConfig) runs once per quantized cell, when the matrix is read; the run builds
    every cell from that record (the earlier harness made each cell's config twice, to validate and to build)."""
    made = []
    original = DynamicQuantizer.configure

    def counting(self, cell):
        made.append(cell_id(cell))
        return original(self, cell)

    monkeypatch.setattr(DynamicQuantizer, "configure", counting)
    matrix = load_matrix("smoke", ["run.steps=2", "run.n_samples=2", "run.batch_size=2", "run.metrics=['psnr_to_fp']"])
    quantized = [cell_id(c) for c in matrix.cells if c.base != "fp"]
    assert quantized and sorted(made) == sorted(quantized)
    made.clear()
    summary = Runner(matrix, tmp_path / "run", device="cpu", progress=False, log=lambda text: None).run()
    assert summary.failed == [] and summary.ran == len(matrix.cells) and made == []
    assert all(isinstance(r, ResolvedCell) for r in matrix.resolutions.values())


def test_the_hook_that_changed_cells_in_place_is_refused():
    with pytest.raises(TypeError, match="normalise.*check"):
        class OldStyle(BaseQuantizer):  # noqa: F841
            def resolve(self, cell):
                cell.a_granularity = "tensor"


def test_a_skipped_cell_cannot_be_built(digits_model):
    with pytest.raises(ValueError, match="skipped"):
        build(resolve_cell(_cell(modulation="ec", a_bits=32)), digits_model, torch.device("cpu"))


def test_every_benchmark_configuration_is_a_cell_the_harness_builds():
    """benchmarks/execution.py builds each configuration as the harness builds a cell: every one resolves."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import execution
    finally:
        sys.path.pop(0)
    for name, settings in execution.CONFIGS.items():
        settings = {"base": "fp", "modulation": "off", "w_bits": 32, "a_bits": 32, "a_granularity": "none",
                    **{k: v for k, v in settings.items() if k != "autocast"}}
        resolved = resolve_cell(_cell(**settings))
        assert resolved.skip is None, (name, resolved.skip)
        if settings["base"] == "dynamic":
            assert resolved.config.symmetric and resolved.config.weight_symmetric, name
            assert resolved.config.execution == settings["execution"], name
