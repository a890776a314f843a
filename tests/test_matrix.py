"""Matrix files (``bench.matrix``): the shipped presets, cell ids, axes, ``--set`` overrides and several
``[[matrix]]`` blocks, skipped combinations, and resolving a matrix: a mistake in a matrix file or a setting is
one line and exit status 2 before anything runs (``--dry-run`` too), one that may be deliberate a warning."""

import pytest
from test_cli import _cli_error, _error_line

from bench.cli import main
from bench.errors import BenchError
from bench.matrix import build_matrix, cell_id, load_matrix
from bench.matrix_file import apply_overrides, load_config, presets


def _smoke(**run):
    data, source, folder = load_config("smoke")
    data["run"].update(run)
    return data


def test_presets_ship_and_the_digits_preset_is_the_issue_matrix():
    assert {"digits", "smoke"} <= set(presets())
    matrix = load_matrix("digits")
    dit = [c for c in matrix.cells if c.model == "digits-dit"]  # the second model, below
    matrix.cells = [c for c in matrix.cells if c.model == "digits"]
    later = [c for c in matrix.cells if (c.execution, c.dtype) != ("fake", "float32")]
    # int8: {ltq (tensor), psq (sample)} x {off, ec} x W8 x A{8, 4, 3}; and the BF16 full-precision cell
    assert sorted((c.base, c.execution, c.dtype, c.modulation, c.a_bits) for c in later) == sorted(
        [(b, "int8", "float32", m, a) for b in ("ltq", "psq") for m in ("off", "ec") for a in (8, 4, 3)]
        + [("fp", "fake", "bfloat16", "off", 32)])
    cells = [c for c in matrix.cells if c.cache == "none" and c.base not in ("qdiff", "ptqd") and c not in later]
    # FP once + {ltq, lcq} x {off, plain, ec} x W{8, 4} x A{8, 6, 4, 3, 2}
    assert len(cells) == 1 + 2 * 3 * 2 * 5 and not matrix.skipped
    baselines = sorted((c.method, c.w_bits, c.a_bits) for c in matrix.cells if c.base in ("qdiff", "ptqd"))
    assert baselines == [("ptqd", 8, 3), ("ptqd", 8, 4), ("qdiff", 8, 3), ("qdiff", 8, 4), ("qdiff+ec", 8, 3),
                         ("qdiff+ec", 8, 4)]
    cached = sorted(c.method for c in matrix.cells if c.cache != "none")
    assert cached == ["fp+deepcache-u2", "fp+deepcache-u3", "fp+deepcache-u5", "lcq+deepcache-u3",
                      "lcq+deepcache-u3", "lcq+ec+deepcache-u3", "lcq+ec+deepcache-u3"]
    assert sum(c.base == "fp" for c in cells) == 1
    assert {(c.base, c.a_granularity) for c in cells if c.base != "fp"} == {("ltq", "tensor"), ("lcq", "channel")}
    assert {c.a_bits for c in cells if c.base != "fp"} == {8, 6, 4, 3, 2}
    assert matrix.run["n_samples"] >= 512
    assert len({cell_id(c) for c in cells}) == len(cells)
    # the digits DiT: FP in float32 and bfloat16; ltq at A8/A6/A4/A3 and psq at A8/A4/A3, alone and with MoDiff;
    # per-token scales; psq on int8 kernels; diffusers' four caches alone and under ltq + MoDiff; torchao's two
    assert len(dit) == 32 and len(matrix.cells) == 87
    plain = sorted((c.method, c.a_bits) for c in dit if (c.execution, c.dtype, c.cache) == ("fake", "float32", "none")
                   and not c.base.startswith("torchao"))
    assert plain == sorted([("fp", 32), ("dynamic", 4), ("dynamic+ec", 4)]
                           + [(b + e, a) for b, bits in (("ltq", (8, 6, 4, 3)), ("psq", (8, 4, 3)))
                              for e in ("", "+ec") for a in bits])
    caches = ("fbcache-0.05", "pab-2", "fastercache", "taylorseer-2")
    assert sorted(c.method for c in dit if c.cache != "none") == sorted(
        [f"{b}+{cache}" for b in ("fp", "ltq+ec") for cache in caches])
    assert sorted((c.method, c.execution, c.dtype) for c in dit if (c.execution, c.dtype) != ("fake", "float32")) == [
        ("fp", "fake", "bfloat16"), ("psq", "int8", "float32"), ("psq", "int8", "float32"),
        ("psq+ec", "int8", "float32"), ("psq+ec", "int8", "float32"), ("torchao-w8a8", "int8", "float32")]
    assert {c.a_granularity for c in dit if c.base == "dynamic"} == {"token"}
    assert matrix.run["trace_layer"] == {"digits": "mid_block.resnets.0.conv1",
                                         "digits-dit": "transformer_blocks.2.ff.net.2"}


def test_cell_ids_are_stable_and_depend_on_every_setting():
    a = load_matrix("smoke").cells
    b = load_matrix("smoke").cells
    assert [cell_id(c) for c in a] == [cell_id(c) for c in b]
    assert cell_id(a[1]) == "6e0c57afb68f"  # recorded: a changed id would orphan every finished result
    for override in ("steps=6", "seed=1", "run.batch_size=2", "params.lcq.warmup=false", "n_samples=9"):
        changed = load_matrix("smoke", [override]).cells
        assert cell_id(changed[1]) != cell_id(a[1]), override
    assert cell_id(load_matrix("smoke", ["run.metrics=['psnr_to_fp']"]).cells[1]) == cell_id(a[1])


def test_invalid_combinations_are_skipped_with_reasons_and_duplicates_merged():
    data = _smoke()
    data["matrix"].update(a_bits=[32, 4, 0], base=["fp", "lcq", "ltq"], modulation=["off", "ec"],
                          a_granularity=["auto", "channel"])
    matrix = build_matrix(data)
    reasons = {s["reason"] for s in matrix.skipped}
    assert any("32-bit activations is the identity" in r for r in reasons)
    assert any("a_bits=0" in r and "modulation" in r for r in reasons)
    assert any("ltq quantizes activations tensor-wise" in r for r in reasons)
    assert sum(c.base == "fp" for c in matrix.cells) == 1  # 2 x 3 x 2 fp combinations, one cell
    kept = {(c.base, c.modulation, c.a_bits, c.a_granularity) for c in matrix.cells}
    assert ("lcq", "ec", 0, "channel") in kept  # 0-bit residuals: MoDiff as a cache
    assert ("lcq", "off", 32, "channel") in kept  # weight-only quantization
    assert ("ltq", "off", 4, "tensor") in kept and ("ltq", "off", 4, "channel") not in kept


def test_overrides_and_axes_given_as_run_scalars():
    data = apply_overrides(load_config("smoke")[0], ["steps=7", "matrix.a_bits=[3, 2]", "run.sampler='ddpm-quad'",
                                                     "model=digits"])
    matrix = build_matrix(data)
    assert {c.steps for c in matrix.cells} == {7} and {c.sampler for c in matrix.cells} == {"ddpm-quad"}
    assert {c.a_bits for c in matrix.cells if c.base != "fp"} == {3, 2}
    data = apply_overrides(load_config("smoke")[0], ["matrix.steps=[3, 4]"])
    assert {c.steps for c in build_matrix(data).cells} == {3, 4}


def test_several_matrix_blocks_give_the_union_of_their_products(tmp_path):
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 4\n[[matrix]]\nbase = ["fp", "lcq"]\na_bits = [8, 4]\n'
                      '[[matrix]]\nbase = ["fp"]\ncache = ["deepcache-u2"]\n')
    matrix = load_matrix(str(config))
    assert sorted(c.method for c in matrix.cells) == ["fp", "fp+deepcache-u2", "lcq", "lcq"]
    assert len(matrix.resolved()["matrix"]) == 2
    changed = load_matrix(str(config), ["matrix.steps=[3]"])  # --set reaches every block
    assert {c.steps for c in changed.cells} == {3}
    assert len(changed.cells) == len(matrix.cells)


def test_a_parameter_given_as_a_list_is_an_axis(tmp_path, capsys):
    config = tmp_path / "m.toml"
    config.write_text('[run]\nsteps = 4\n[[matrix]]\nbase = ["lcq"]\na_bits = [4, 3]\nmodulation = ["ec"]\n'
                      '[matrix.params.lcq]\nwarmup = [true, false]\nsymmetric = false\n'
                      '[[matrix]]\nbase = ["fp"]\n')
    matrix = load_matrix(str(config))
    swept = sorted((c.a_bits, c.params["lcq"]["warmup"], c.params["lcq"]["symmetric"])
                   for c in matrix.cells if c.base == "lcq")
    assert swept == [(3, False, False), (3, True, False), (4, False, False), (4, True, False)]
    assert len({cell_id(c) for c in matrix.cells}) == 5
    # the same cells as two blocks written out by hand: same ids, so results are shared with such runs
    by_hand = tmp_path / "h.toml"
    by_hand.write_text('[run]\nsteps = 4\n' + "".join(
        f'[[matrix]]\nbase = ["lcq"]\na_bits = [4, 3]\nmodulation = ["ec"]\n'
        f'[matrix.params.lcq]\nwarmup = {w}\nsymmetric = false\n' for w in ("true", "false")) +
        '[[matrix]]\nbase = ["fp"]\n')
    assert sorted(map(cell_id, load_matrix(str(by_hand)).cells)) == sorted(map(cell_id, matrix.cells))
    # --set reaches a block's params, a swept value is type-checked like any other
    plain = tmp_path / "p.toml"
    plain.write_text('[run]\nsteps = 4\n[matrix]\nbase = ["lcq"]\na_bits = [4]\n')
    swept = load_matrix(str(plain), ["matrix.params.lcq.symmetric=[true,false]"])
    assert sorted(c.params["lcq"]["symmetric"] for c in swept.cells) == [False, True]
    with pytest.raises(BenchError, match="params.lcq.warmup must be true or false, got 'no'"):
        load_matrix(str(plain), ["matrix.params.lcq.warmup=[true,'no']"])
    with pytest.raises(BenchError, match="at least one value"):
        load_matrix(str(plain), ["params.lcq.warmup=[]"])


# -- a mistake in a matrix or a setting: one line and exit status 2 before anything runs ----------
@pytest.mark.parametrize("argv,match", [
    (["run", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["run", "smoke", "--set", "matrix.base=['qdiff9']"], "unknown base quantizer 'qdiff9'"),
    (["run", "smoke", "--set", "matrix.cache=['bogus-x']"], "unknown cache 'bogus-x'"),
    (["run", "smoke", "--set", "matrix.cache=['deepcache-x3']"], "expected deepcache-u<N>"),
    (["run", "smoke", "--set", "model=cifar99"], "unknown model 'cifar99'"),
    (["run", "smoke", "--set", "run.metrics=['fid2']"], "unknown metric 'fid2'"),
    (["run", "smoke", "--set", "matrix.a_bits=[1]"], "a_bits must be 2..16"),
    (["run", "smoke", "--set", "matrix.w_bits=[0]"], "w_bits must be 2..16"),
    (["run", "smoke", "--set", "matrix.a_bits=[]"], "the matrix is empty"),
    (["run", "smoke", "--set", "matrix.base=['lcq']", "--set", "matrix.a_bits=[32]",
      "--set", "matrix.modulation=['ec']"], "the matrix is empty"),
    (["run", "smoke", "--set", "run.steps=5000"], "steps must be between 1 and 1000"),
    (["run", "smoke", "--set", "params.lcq.nonsense=1"], "has no parameter 'nonsense'"),
    (["run", "smoke", "--set", "bogus=1"], "unknown key"),
    (["run", "smoke", "--device", "tpu"], "device"),
    (["methods", "--import", "no_such_module_xyz"], "cannot import module"),
    (["run", "smoke", "--set", "inception.weights='/nonexistent/w.pth'"], "is not a file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, match, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"] if argv[0] == "run" else argv) == 2
    line = _error_line(capsys)
    assert line.startswith("modiff-bench: error:") and match in line, line
    assert not out.exists()


def test_malformed_toml_is_one_line_error(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nsteps = = 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "malformed TOML" in _error_line(capsys)
    bad.write_text("[run]\nsteps = 'many'\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "run.steps must be int" in _error_line(capsys)
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in _error_line(capsys)


def test_binary_matrix_file(tmp_path, capsys):
    path = tmp_path / "matrix.toml"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "is not a text (UTF-8 TOML) file" in _cli_error(capsys)


@pytest.mark.parametrize("text,match", [
    ("run = 5\n", "run must be a table"),
    ("params = 'x'\n", "params must be a table"),
    ("inception = [1]\n", "inception must be a table"),
])
def test_sections_that_are_not_tables(tmp_path, capsys, text, match):
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert match in _cli_error(capsys)


def test_matrix_path_that_is_a_directory(tmp_path, capsys):
    folder = tmp_path / "grid.toml"
    folder.mkdir()
    for path in (folder, tmp_path):
        assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
        assert "is a directory" in _cli_error(capsys)


def test_the_largest_seeds_are_accepted(tmp_path):
    matrix = load_matrix("smoke", ["seed=18446744073709551608"])  # 8 samples: the last is 2^64 - 1
    assert max(matrix.cells[0].seeds) == 2**64 - 1


def test_steps_above_T_are_caught_by_dry_run(tmp_path, capsys):
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run", "--set", "steps=1001"]) == 2
    assert "steps must be between 1 and 1000" in _cli_error(capsys)
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--dry-run", "--set", "steps=1000"]) == 0


# -- n_samples that no cell can hold -----------------------------------------------------------
def test_absurd_n_samples_is_refused_at_resolution_with_the_bound(tmp_path, capsys):
    """10**12 samples ended in a bare MemoryError in every cell."""
    for extra in (["--dry-run"], []):
        assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--set", "run.n_samples=1000000000000",
                     *extra]) == 2
        line = _cli_error(capsys)
        assert "run.n_samples = 1000000000000" in line and "the limit is 1 TiB" in line and "digits" in line
    assert not (tmp_path / "o").exists()
    # a large but sane count still resolves (50,000 of the largest zoo images pass the bound)
    assert main(["run", "smoke", "--out", str(tmp_path / "o"), "--set", "run.n_samples=100000", "--dry-run"]) == 0
    load_matrix("cifar10-quick", ["run.n_samples=50000"])


# -- an empty matrix file ----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "# nothing declared yet\n\n"])
def test_an_empty_matrix_file_is_refused(tmp_path, capsys, text):
    """It ran a default cell (digits, lcq W8A8) nobody declared."""
    path = tmp_path / "m.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 2
    assert "is empty" in _cli_error(capsys)


# -- [params.X] for a method the matrix does not run -------------------------------------------
def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("modiff-bench: warning:")]


def test_params_of_a_method_the_matrix_does_not_run(tmp_path, capsys):
    """A [params.X] block for a method no cell runs was accepted without a word; a typo is an error."""
    out = ["--out", str(tmp_path / "o"), "--dry-run"]
    assert main(["run", "smoke", *out, "--set", "params.qdiff.cali_n=4"]) == 0
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "[params.qdiff] is not used" in warnings[0], warnings
    assert main(["run", "smoke", *out, "--set", "matrix.params.deepcache.center=2"]) == 0
    warnings = _warnings(capsys)
    assert len(warnings) == 1 and "matrix.params.deepcache is not used" in warnings[0], warnings

    # carried by a method built on it: PTQD's base, paper-lcq's Q-Diffusion weights
    for base in ("ptqd", "paper-lcq"):
        assert main(["run", "smoke", *out, "--set", "params.qdiff.cali_st=4", "--set", f"matrix.base=['{base}']",
                     "--set", "matrix.modulation=['off']"]) == 0
        assert _warnings(capsys) == [], base
    assert main(["run", "smoke", *out, "--set", "params.qdif.cali_n=4"]) == 2
    assert "unknown method (did you mean 'qdiff'?)" in _cli_error(capsys)


def test_no_shipped_preset_warns():
    for name in presets():
        assert load_matrix(name).warnings == [], name


def test_library_checks_reach_the_user_as_one_line_errors_at_the_boundary():
    """The library (``modiff``) raises ValueError naming the setting; resolving a matrix turns it into a one-line
    BenchError (exit status 2 at the CLI); anything else, a bug, keeps its type and traceback."""
    from bench.errors import user_input
    from modiff.samplers import SamplerConfig, check_seeds
    from modiff.schedules import NoiseSchedule

    with pytest.raises(ValueError, match="run.seed must be >= 0"):
        check_seeds(-1, 4, "run.seed")
    with pytest.raises(BenchError, match="run.seed must be >= 0"):
        load_matrix("smoke", ["run.seed=-1"])
    with pytest.raises(BenchError, match=r"^--steps: steps must be between 1 and 1000 \(T\), got 0$"):
        with user_input("--steps"):
            SamplerConfig.from_name("ddim-quad", 0).timesteps(NoiseSchedule.linear())
    with pytest.raises(RuntimeError, match="a bug"):
        with user_input():
            raise RuntimeError("a bug")


def test_a_parameter_declared_as_an_optional_list_keeps_its_list():
    """TaylorSeer's ``cache_identifiers`` is ``list | None``: a list there is the value, not a sweep (it was swept,
    one cell per pattern, and each refused as "must be a list")."""
    patterns = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.attn2"]
    matrix = build_matrix({"run": {"model": "digits-dit", "steps": 5}, "matrix": {"base": ["fp"],
                                                                                  "cache": ["taylorseer-2"]},
                           "params": {"taylorseer": {"cache_identifiers": patterns}}})
    (cell,) = matrix.cells
    assert cell.params["taylorseer"]["cache_identifiers"] == patterns
    # a parameter declared as one value still sweeps
    swept = build_matrix({"run": {"steps": 5}, "matrix": {"base": ["lcq"], "a_bits": [4], "modulation": ["ec"]},
                          "params": {"lcq": {"warmup": [True, False]}}})
    assert sorted(c.params["lcq"]["warmup"] for c in swept.cells) == [False, True]
