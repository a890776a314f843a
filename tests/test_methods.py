"""The method registry (``bench.methods``): registering methods and method plugins, typed method parameters
(checked when a matrix is resolved), parameters that name files, method versions in cell ids, and whether a
cell's method quantizes attention."""

import json
import sys
from dataclasses import asdict, replace

import pandas as pd
import pytest
from test_cli import _cli_error

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import build_matrix, cell_id, load_matrix
from bench.matrix_file import load_config
from bench.methods import DynamicQuantizer, methods, register_method


# -- registering methods, and method plugins ------------------------------------------------
def test_a_method_plugin_is_one_file(tmp_path, capsys):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(
        "from bench.methods import DynamicQuantizer, register_method\n\n"
        "@register_method('lcq-sym-test')\n"
        "class SymmetricLCQ(DynamicQuantizer):\n"
        "    '''LCQ with a symmetric activation grid.'''\n"
        "    granularity = 'channel'\n\n"
        "    def modiff_options(self):\n"
        "        return {**super().modiff_options(), 'symmetric': True}\n")
    assert main(["methods", "--import", str(plugin)]) == 0
    assert "lcq-sym-test" in capsys.readouterr().out
    config = tmp_path / "mine.toml"
    config.write_text('[run]\nimports = ["my_method.py"]\nsteps = 3\nn_samples = 4\nbatch_size = 4\n'
                      'metrics = ["psnr_to_fp"]\n[matrix]\nbase = ["lcq", "lcq-sym-test"]\na_bits = [4]\n')
    assert main(["run", str(config), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "o" / "results.csv").set_index("base")
    assert table.loc["lcq-sym-test", "status"] == "ok"
    assert table.loc["lcq-sym-test", "psnr_to_fp"] != table.loc["lcq", "psnr_to_fp"]


def test_registry_rejects_clashes_and_non_methods():
    assert {"fp", "ltq", "lcq", "psq", "dynamic"} <= set(methods("base"))
    with pytest.raises(ValueError, match="already registered"):
        register_method("lcq")(type("Other", (DynamicQuantizer,), {}))
    with pytest.raises(TypeError):
        register_method("not-a-method")(object)
    with pytest.raises(BenchError, match="no parameter"):
        methods()["lcq"]({"bits": 3})


# -- method parameters are typed ------------------------------------------------------------
def _smoke_params(**params) -> dict:
    data, _, _ = load_config("smoke")
    data["params"] = params
    return data


@pytest.mark.parametrize("method,key,value,match", [
    ("lcq", "warmup", "false", "params.lcq.warmup must be true or false, got 'false'"),
    ("lcq", "warmup", "False", "TOML booleans are lower case"),
    ("lcq", "symmetric", "no", "params.lcq.symmetric must be true or false"),
    ("lcq", "warmup", 1, "params.lcq.warmup must be true or false, got 1"),
    ("lcq", "weight_method", "percentile", "params.lcq.weight_method must be one of 'minmax', 'mse'"),
    ("lcq", "residual_tolerance", "0.1", "params.lcq.residual_tolerance must be a number (or left unset)"),
    ("lcq", "residual_tolerance", True, "residual_tolerance must be a number"),
    ("qdiff", "quant_attention", 1, "params.qdiff.quant_attention must be one of 'auto', true, false"),
    ("qdiff", "cali_n", 2.5, "params.qdiff.cali_n must be an integer"),
    ("qdiff", "weight_lr", "1e-3", "params.qdiff.weight_lr must be a number"),
    ("ptqd", "correct_variance", "yes", "params.ptqd.correct_variance must be true or false"),
    ("deepcache", "center", 1.5, "params.deepcache.center must be an integer (or left unset)"),
])
def test_wrongly_typed_parameters_are_refused_when_the_matrix_is_resolved(method, key, value, match):
    with pytest.raises(BenchError, match=match.replace("(", r"\(").replace(")", r"\)")):
        build_matrix(_smoke_params(**{method: {key: value}}), "test")


def test_well_typed_parameters_are_accepted_and_keep_their_meaning():
    matrix = build_matrix(_smoke_params(lcq={"warmup": False, "residual_tolerance": 0, "weight_method": "mse"}), "test")
    lcq = [c for c in matrix.cells if c.base == "lcq"]
    assert lcq and all(c.params["lcq"]["warmup"] is False for c in lcq)
    assert all(c.params["lcq"]["residual_tolerance"] == 0 for c in lcq)
    build_matrix(_smoke_params(deepcache={"center": 2, "power": 2}, qdiff={"quant_attention": "auto"}), "test")
    # defaults of None declare nothing unless PARAM_TYPES says so; every built-in parameter has a type
    from bench.methods import param_type

    untyped = [(n, k) for n, cls in methods().items() for k in cls.PARAMS if param_type(cls, k) is None]
    assert untyped == [], untyped


def test_set_with_a_python_boolean_is_one_line_exit_2(capsys, tmp_path):
    """``--set params.lcq.warmup=False`` used to run WITH warm-up (the string 'False' is true)."""
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run",
                 "--set", "params.lcq.warmup=False"]) == 2
    line = _cli_error(capsys)
    assert "params.lcq.warmup must be true or false, got 'False'" in line and "lower case" in line
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run",
                 "--set", "params.lcq.weight_method='bogus'"]) == 2  # an enum: caught before any cell runs
    assert "weight_method must be one of" in _cli_error(capsys)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("this is not python\n")
    (tmp_path / "raising.py").write_text("raise RuntimeError('plugin broke\\non two lines')\n")
    (tmp_path / "raising_mod_xyz.py").write_text("raise ValueError('module-level failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("raising_mod_xyz", None)


@pytest.mark.parametrize("spec,match", [
    ("notes.txt", "is not a Python (.py) file"),
    ("", "expected a module name or a path to a .py file"),
    ("raising.py", "importing 'raising.py' failed: RuntimeError: plugin broke on two lines"),
    ("raising_mod_xyz", "importing 'raising_mod_xyz' failed: ValueError: module-level failure"),
])
def test_bad_imports_in_matrix_and_methods(plugins, capsys, spec, match):
    matrix = plugins / "m.toml"
    matrix.write_text(f"[run]\nimports = [{spec!r}]\n".replace("'", '"'))
    assert main(["run", str(matrix), "--out", str(plugins / "o"), "--dry-run"]) == 2
    assert match in _cli_error(capsys)
    assert main(["methods", "--import", spec]) == 2
    assert match in _cli_error(capsys)


# -- files a method's parameters name ----------------------------------------------------------
def _paper_lcq(tmp_path, cali_ckpt: str):
    path = tmp_path / "m.toml"
    path.write_text('[run]\nmodel = "ddpm-cifar10"\nsteps = 2\nn_samples = 2\nbatch_size = 2\n'
                    '[matrix]\nbase = ["paper-lcq"]\nw_bits = [4]\na_bits = [8]\n'
                    f'[params.paper-lcq]\ncali_ckpt = "{cali_ckpt}"\n')
    return path


def test_missing_cali_ckpt_stops_the_command_before_anything_runs(tmp_path, capsys, monkeypatch):
    """A missing authors' checkpoint failed the cell, after the full-precision reference was sampled."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.pth").mkdir()
    for name, match in (("cifar_w4a8_ckpt.pth", "cifar_w4a8_ckpt.pth does not exist"),
                        ("folder.pth", "folder.pth is not a file")):
        assert main(["run", str(_paper_lcq(tmp_path, name)), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
        line = _cli_error(capsys)
        assert "params.paper-lcq.cali_ckpt" in line and match in line, line
        assert "current directory" in line  # where a relative path was looked for
    (tmp_path / "cifar_w4a8_ckpt.pth").write_bytes(b"")  # present: what it holds is checked when it is read
    assert main(["run", str(_paper_lcq(tmp_path, "cifar_w4a8_ckpt.pth")), "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 0


# -- method versions, and what a cell's method quantizes ----------------------------------------
def _digits_cell(base, **changes):
    cell = next(c for c in load_matrix("digits").cells if c.base == base)
    return replace(cell, **changes)


def test_method_versions_name_exactly_the_changed_cells():
    from bench.methods import method_versions  # (new names are imported in the tests that need them)

    assert method_versions(asdict(_digits_cell("ltq"))) == {}
    assert method_versions(asdict(_digits_cell("lcq", cache="deepcache-u3"))) == {}
    assert method_versions(asdict(_digits_cell("qdiff"))) == {"qdiff": 3}
    assert method_versions(asdict(_digits_cell("ptqd"))) == {"qdiff": 3}  # PTQD runs on the Q-Diffusion model
    ltq = _digits_cell("ltq")
    dynamic = {**asdict(ltq), "base": "dynamic", "params": {"dynamic": ltq.params["ltq"]}}
    assert method_versions({**dynamic, "a_granularity": "sample-channel"}) == {"dynamic": 2}
    assert method_versions({**dynamic, "a_granularity": "sample"}) == {}
    assert method_versions({**asdict(ltq), "cache": "deepcache-nu3"}) == {"deepcache": 2}
    # ids: unchanged for the methods that did not change, new for the others
    assert cell_id(load_matrix("smoke").cells[1]) == "6e0c57afb68f"
    qdiff = _digits_cell("qdiff")
    old = json.dumps({k: v for k, v in __import__("bench.methods", fromlist=["id_settings"]).id_settings(
        asdict(qdiff)).items() if k != "method_versions"}, sort_keys=True, separators=(",", ":"))
    assert cell_id(qdiff) != __import__("hashlib").sha256(old.encode()).hexdigest()[:12]


def test_cells_say_whether_their_attention_is_quantized():
    from bench.methods import base_quantizer

    ltq = _digits_cell("ltq")
    assert base_quantizer("ltq").quantizes_attention(ltq) is False
    qdiff = _digits_cell("qdiff")
    q = base_quantizer("qdiff", qdiff.params["qdiff"])
    assert q.quantizes_attention(qdiff) is True  # Q-Diffusion alone quantizes q, k, v and the probabilities
    assert q.quantizes_attention(replace(qdiff, modulation="ec")) is False  # MoDiff's code keeps them in float
    ptqd = _digits_cell("ptqd")
    assert base_quantizer("ptqd", ptqd.params["ptqd"]).quantizes_attention(ptqd) is True


# -- other names ----------------------------------------------------------------------------------
def test_an_alias_runs_its_method_and_moves_no_cell_id(capsys):
    """``authors-tensor`` / ``authors-sample`` say the granularity of ``paper-lcq`` / ``paper-ltq``: a matrix may use
    either name, its parameter tables included, and the cells record (and their ids hash) the registered name."""
    named = build_matrix({"matrix": {"base": ["paper-lcq", "paper-ltq"], "a_bits": [4]},
                          "params": {"paper-lcq": {"weights": "minmax"}}})
    aliased = build_matrix({"matrix": {"base": ["authors-tensor", "authors-sample", "paper-lcq"], "a_bits": [4]},
                            "params": {"authors-tensor": {"weights": "minmax"}}})
    assert [cell_id(c) for c in aliased.cells] == [cell_id(c) for c in named.cells]
    assert [(c.base, c.a_granularity) for c in aliased.cells] == [("paper-lcq", "tensor"), ("paper-ltq", "sample")]
    assert aliased.cells[0].params["paper-lcq"]["weights"] == "minmax" and aliased.resolved()["params"] == {
        "paper-lcq": {"weights": "minmax"}}
    with pytest.raises(BenchError, match="'authors-tensor' and 'paper-lcq' name the same method"):
        build_matrix({"matrix": {"base": ["paper-lcq"]}, "params": {"paper-lcq": {}, "authors-tensor": {}}})
    assert main(["methods"]) == 0
    assert "(also: authors-tensor)" in capsys.readouterr().out


def test_an_alias_cannot_take_a_registered_name():
    with pytest.raises(ValueError, match="'lcq' is already registered"):
        @register_method("lcq-alias-test", aliases=("lcq",))
        class Clash(DynamicQuantizer):  # noqa: F841
            pass
