"""``modiff-bench``: the suite's command line.

User mistakes (unknown names, numbers out of range, missing or corrupt checkpoints) end in one
line on stderr and exit status 2; a failed quality bar ends in exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .errors import BenchError, user_input


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, n_default: int, batch_default: int) -> None:
    p.add_argument("--model", default="digits", help="zoo model name (see 'modiff-bench models'; default: digits)")
    p.add_argument("--checkpoint", default=None,
                   help="weights to load instead of the model's packaged/default ones: a directory, a checkpoint "
                        "file or a hub id, depending on the model ('modiff-bench models')")
    p.add_argument("--sampler", default="ddim-quad",
                   help="ddim-quad | ddim-uniform | ddpm-quad | ddpm-uniform | plms | dpm-solver++ | ... for the DDPM "
                        "family, flow-euler | flow-heun for flow-matching models (SD3, FLUX) (default: ddim-quad, as "
                        "in the paper)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps, 1..T (default: 100)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta in [0, 1]; 0 = deterministic (default: 0)")
    p.add_argument("--n", type=_positive_int, default=n_default, help=f"number of images (default: {n_default})")
    p.add_argument("--seed", type=int, default=0,
                   help="first per-sample seed; image i uses seed SEED+i whatever the batch size (default: 0)")
    p.add_argument("--batch-size", type=_positive_int, default=batch_default,
                   help=f"images per denoiser call (default: {batch_default})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modiff-bench",
        description="Benchmark and reproduce quantized / cached diffusion sampling (MoDiff and baselines). "
                    "Every command writes its outputs with the config, seeds, versions and git revision.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", help="list the model zoo, or load one and show what was loaded",
                       description="List the models the zoo can load. With --check NAME, load that model (from "
                                   "--checkpoint, or its default source) and print what was loaded: source, "
                                   "files and their SHA-256, and for DDPM CIFAR-10 whether the weights are the "
                                   "EMA ones the papers used. run.json records the same for every run.")
    p.add_argument("--check", metavar="NAME", default=None, help="load this model and print its provenance")
    p.add_argument("--checkpoint", default=None, help="with --check: a local path or hub id to load from")

    p = sub.add_parser("sample", help="sample images with a full-precision model and save a PNG grid",
                       description="Sample images from a zoo model in full precision. Writes OUT/samples.png, "
                                   "OUT/samples.pt (images + seeds) and OUT/run.json (config, timing, provenance).")
    _add_sampling_args(p, n_default=64, batch_default=64)
    p.add_argument("--out", default="runs/sample", help="output directory (default: runs/sample)")

    p = sub.add_parser("quality", help="measure the embedded digits model against its quality bar",
                       description="Sample N images from the digits model and compare them with the held-out "
                                   "digits in the domain classifier's feature space: Frechet distance (vs. an "
                                   "equally large real set), classifier-IS and how confidently samples are "
                                   "classified. Writes OUT/quality.json.")
    _add_sampling_args(p, n_default=360, batch_default=120)
    p.add_argument("--out", default="runs/quality", help="output directory (default: runs/quality)")
    p.add_argument("--require-pass", action="store_true", help="exit with status 1 if the quality bar is not met")

    p = sub.add_parser("train-tiny", help="retrain the embedded digits UNet and its domain classifier",
                       description="Train the embedded default from scratch (classifier, then DDPM UNet with EMA), "
                                   "then sample it and check the quality bar. Exit status 1 if the bar is not met.")
    p.add_argument("--out", default="runs/train-tiny", help="output checkpoint directory (default: runs/train-tiny)")
    p.add_argument("--unet-steps", type=_positive_int, default=None, help="UNet training steps (default: 8000)")
    p.add_argument("--classifier-epochs", type=_positive_int, default=None, help="classifier epochs (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--no-eval", action="store_true", help="skip the quality evaluation after training")
    p.add_argument("--install", action="store_true",
                   help="copy the result over the packaged checkpoint (bench/assets/digits) if it meets the bar")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("train-dit", help="retrain the embedded digits transformer (digits-dit)",
                       description="Train the class-conditional digits DiT from scratch (DDPM with EMA and 10% "
                                   "class dropout for classifier-free guidance), then sample it with guidance and "
                                   "check the quality bar with the digits model's domain classifier, and how often "
                                   "samples are classified as their class. Exit status 1 if the bar is not met.")
    p.add_argument("--out", default="runs/train-dit", help="output checkpoint directory (default: runs/train-dit)")
    p.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: 6000)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--no-eval", action="store_true", help="skip the quality evaluation after training")
    p.add_argument("--install", action="store_true",
                   help="copy the result over the packaged checkpoint (bench/assets/digits-dit) if it meets the bar")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser(
        "run", help="run a declared matrix of cells (model x sampler x bits x method x cache), resumably",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every cell of a matrix and write one row per cell to OUT/results.csv and "
                    "OUT/results.parquet (settings, metrics, timings, memory, GBops, versions, git revision), "
                    "OUT/run.json (resolved matrix, skipped combinations, environment) and each cell's samples.",
        epilog="Rerunning the same command skips finished cells: kill it at any time and run it again. A cell "
               "that raises or produces NaN/Inf samples is recorded as failed, the run goes on and the exit "
               "status is 1 (failed cells are retried on the next run). Bad input exits with status 2; cells left "
               "to another runner sharing OUT (held by it) with status 3.\n\n"
               "examples:\n"
               "  modiff-bench run digits --out runs/digits\n"
               "  modiff-bench run smoke --out runs/smoke --set steps=10 --set matrix.a_bits=[4,3]\n"
               "  modiff-bench run my_matrix.toml --out runs/mine --device cuda\n"
               "  modiff-bench run cifar10-paper --estimate --device cuda --set run.checkpoint=/models/c10\n"
               "  torchrun --standalone --nproc_per_node=8 -m bench run cifar10-paper --device cuda ...\n"
               "  modiff-bench run cifar10-paper --launcher submitit --slurm-partition gpu --gpus-per-task 4 ...")
    p.add_argument("config", metavar="CONFIG", help="preset name (see 'modiff-bench presets') or path to a TOML file")
    p.add_argument("--out", default=None, help="output directory (default: runs/<preset or file name>); an existing "
                                               "one must be empty or a run directory, unless --force")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, value in TOML syntax: steps=50, run.n_samples=128, "
                        "matrix.a_bits=[4,3], params.lcq.warmup=false (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto = cuda if available)")
    p.add_argument("--force", action="store_true",
                   help="rerun every cell, replacing the results in OUT (also those of a different matrix, or "
                        "files of a directory that is not a run directory)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and skipped combinations, run nothing")
    p.add_argument("--estimate", action="store_true",
                   help="measure throughput on the device, print the estimated device-hours of the pending "
                        "cells, run nothing (the estimate is also printed before every run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group(
        "scale-out", "Several GPUs or nodes: start the command under torchrun (torchrun --nproc_per_node=8 -m "
                     "bench run ...); every rank samples its share of each cell's seed chunks. A SLURM cluster: "
                     "--launcher submitit submits the pending cells as a job array sharing OUT.")
    g.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: run here (default); submitit: submit a SLURM job array and return")
    g.add_argument("--slurm-partition", default=None, help="SLURM partition (required with submitit on SLURM)")
    g.add_argument("--slurm-time", type=_positive_int, default=24 * 60, metavar="MIN",
                   help="time limit per task in minutes (default: 1440)")
    g.add_argument("--gpus-per-task", type=_positive_int, default=1,
                   help="GPUs (= processes sharding each cell) per array task, on one node (default: 1)")
    g.add_argument("--cpus-per-task", type=_positive_int, default=8, help="CPUs per process (default: 8)")
    g.add_argument("--cells-per-task", type=_positive_int, default=1, help="cells per array task (default: 1)")
    g.add_argument("--array-parallelism", type=_positive_int, default=64,
                   help="array tasks running at once (default: 64)")
    g.add_argument("--slurm-account", default=None, help="SLURM account")
    g.add_argument("--slurm-qos", default=None, help="SLURM QOS")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other submitit SLURM parameter, e.g. constraint=a100 (repeatable)")
    g.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default=None,
                   help="submitit executor (default: SLURM when sbatch is available); local runs the tasks as "
                        "processes on this machine")
    g.add_argument("--wait", action="store_true", help="with submitit: wait for the array, then rebuild the tables")

    sub.add_parser("presets", help="list the matrix presets shipped with the package",
                   description="List the shipped matrix presets: name and what each one runs.")
    p = sub.add_parser("methods", help="list the registered base quantizers and cache schemes",
                       description="List the methods a matrix can name in matrix.base and matrix.cache, with "
                                   "their parameters ([params.NAME] in a matrix file).")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="also import this module or .py file that registers methods (repeatable)")

    p = sub.add_parser(
        "evaluate", help="add missing metrics to the generated cells of a run directory (no resampling)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute, from the saved samples of every generated cell of DIR, the metrics the cell does "
                    "not have yet (the matrix's, plus --metrics), add them to its result.json and rewrite the "
                    "tables. Finished metrics are not computed again unless named by --recompute. The matrix and "
                    "[inception] settings come from DIR/run.json; plugins only from --import (a run directory is "
                    "data: the imports its run.json lists are not imported). A full-precision reference that is "
                    "missing, or does not match the size and SHA-256 recorded when it was written, is made again.",
        epilog="Cells still to generate are left for 'modiff-bench run'. Samples that do not match the SHA-256 "
               "recorded when they were written are not used: the cell is marked (in its result.json) to be "
               "generated again by the next run, and the exit status is 1 (also when a metric raised; its columns "
               "stay empty with the reason in missing_metrics). Bad input exits with status 2.\n\n"
               "examples:\n"
               "  modiff-bench evaluate runs/demo\n"
               "  modiff-bench evaluate runs/cifar10 --metrics fid,is --device cuda\n"
               "  modiff-bench evaluate runs/mine --import my_metric.py --recompute my_metric")
    p.add_argument("dir", metavar="DIR", help="a run directory written by 'modiff-bench run'")
    p.add_argument("--metrics", default="", metavar="NAMES",
                   help="comma-separated metrics to add besides the matrix's (see docs/metrics.md)")
    p.add_argument("--recompute", default="", metavar="NAMES",
                   help="comma-separated metrics to compute again for every generated cell that has them (e.g. "
                        "after a fix to a metric: metrics are not part of cell ids)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module or .py file that registers metrics (repeatable)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto = cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser(
        "report", help="render paper-style tables and figures from run directories (HTML + Markdown)",
        description="Write report.html (self-contained) and report.md with figures/ from the results of one or "
                    "more run directories: the paper's Table 1 layout, the error-compensation, warm-up, memory, "
                    "caching and wall-clock tables, plots, and the papers' published numbers beside matching "
                    "settings. Several directories are merged (refused if the same cell was measured twice on one "
                    "device, or cells differ only in hidden settings).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories written by 'modiff-bench run'")
    p.add_argument("--out", default=None, help="where to write the report (default: the run directory; required "
                                               "with several)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module or .py file that registers metrics or methods, for their labels "
                        "(repeatable; the imports a run.json lists are never imported)")

    return parser


def _version() -> str:
    from .provenance import package_versions

    return package_versions()["modiff-bench"] or "unknown"


def check_out_dir(out: str | Path, probe: bool = True) -> Path:
    """Fail early, in one line, when OUT cannot be written: a path under a file, or (``probe``) a
    directory that refuses writes (read-only file system, permissions), found by creating and removing
    a file in OUT or its nearest existing parent. Nothing is left behind."""
    import tempfile

    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() or parent == Path(parent.anchor or "."):
            break
    if not parent.is_dir():
        what = "is a file" if parent == out else f"is under {parent}, which is a file"
        raise BenchError(f"cannot write to {out}: it {what}, not a directory")
    if probe:
        try:
            handle, name = tempfile.mkstemp(prefix=".modiff-bench-write-test-", dir=parent)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise BenchError(f"cannot write to {out}: {exc.strerror or exc} ({parent})") from None
    return out


RUN_DIR_MARKERS = ("run.json", "cells", ".lock", "locks")  # what a run directory has, even a killed or damaged one


def check_run_dir(out: Path, force: bool) -> None:
    """``run --out``: an existing directory must be empty or a run directory (``RUN_DIR_MARKERS``; a
    damaged one is repaired by the store), unless ``--force``: a run writes results.csv, run.log, cells/
    and locks/ into it, and would adopt a directory of other files as its own."""
    if force or not out.is_dir() or any((out / name).exists() for name in RUN_DIR_MARKERS):
        return
    try:
        entries = sorted(entry.name for entry in out.iterdir())
    except OSError as exc:
        raise BenchError(f"cannot read {out}: {exc.strerror or exc}") from None
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise BenchError(f"--out {out} is a directory of other files ({shown}), not a run directory (no run.json); "
                         "use an empty or new directory, or --force to write the run into it")


def _sample_fp(args):
    import torch

    from modiff.flow import FlowSamplerConfig
    from modiff.samplers import check_seeds, sample

    from .build import sampler_from_name
    from .generate import sample_model
    from .zoo import load_model

    with user_input():  # cheap checks first
        config = sampler_from_name(args.sampler, args.steps, args.eta)
        check_seeds(args.seed, args.n, "--seed")
    model = load_model(args.model, args.checkpoint, args.device)
    with user_input():
        config.timesteps(model.schedule)
    seeds = list(range(args.seed, args.seed + args.n))
    start = time.perf_counter()
    if isinstance(config, FlowSamplerConfig) or model.flow is not None:  # flow matching (or the mismatch's one line)
        images = sample_model(model.denoiser(), model, config, seeds, args.batch_size, torch.device(args.device))
    else:
        images = sample(model.denoiser(), model.schedule, config, seeds, model.image_shape, args.batch_size,
                        args.device, progress=not args.no_progress, on_batch=model.start_batch)
    seconds = time.perf_counter() - start
    if model.decoder is not None:  # latent models: decode in batches, in full precision
        images = torch.cat([model.decode(images[i: i + args.batch_size].to(args.device)).cpu()
                            for i in range(0, len(images), args.batch_size)])
    if not images.isfinite().all():
        raise BenchError(f"sampling produced non-finite values ({args.model}, {config.name}, {args.steps} steps)")
    settings = {"model": args.model, "checkpoint": model.info.get("checkpoint"), "model_info": model.info,
                "sampler": config.name,
                "steps": config.steps, "eta": config.eta, "n": args.n, "seeds": [seeds[0], seeds[-1]],
                "batch_size": args.batch_size, "device": args.device}
    return model, images, seeds, settings, seconds


def cmd_models(args) -> int:
    import json

    from .zoo import DESCRIPTIONS, MODELS, load_model, schemes

    if args.checkpoint is not None and args.check is None:
        raise BenchError("--checkpoint needs --check NAME (the model to load it as)")
    if args.check is None:
        for name in MODELS:
            print(f"{name:{max(map(len, MODELS))}s}  {DESCRIPTIONS.get(name, '')}")
        for usage, description in schemes().items():
            print(f"{usage}  {description}")
        return 0
    model = load_model(args.check, args.checkpoint, "cpu")
    print(json.dumps({"model": model.name, "image_shape": list(model.image_shape),
                      "output_shape": list(model.image_output_shape), "default_sampler": model.default_sampler,
                      "default_steps": model.default_steps,
                      "parameters": sum(p.numel() for p in model.unet.parameters()), "info": model.info},
                     indent=2, default=str))
    return 0


def cmd_sample(args) -> int:
    import torch

    from .data import save_grid
    from .provenance import provenance, write_atomic, write_json_atomic

    out = check_out_dir(args.out)
    _, images, seeds, settings, seconds = _sample_fp(args)
    write_atomic(out / "samples.png", lambda tmp: save_grid(images, tmp, image_format="png"))
    write_atomic(out / "samples.pt", lambda tmp: torch.save({"images": images, "seeds": seeds}, tmp))
    write_json_atomic(out / "run.json", {"settings": settings, "seconds": seconds,
                                         "images_per_second": len(seeds) / seconds,
                                         "provenance": provenance(args.device)})
    print(f"{len(seeds)} images in {seconds:.2f} s ({len(seeds) / seconds:.1f} images/s) -> {out / 'samples.png'}")
    return 0


def cmd_quality(args) -> int:
    from .domain import quality_report
    from .provenance import provenance, write_json_atomic
    from .zoo import digits

    if args.model not in ("digits", "digits-dit"):
        raise BenchError(f"the quality bar is defined for the embedded models 'digits' and 'digits-dit' only, not "
                         f"{args.model!r}")
    out = check_out_dir(args.out)
    # a digits-dit checkpoint holds no classifier: the packaged digits one judges both models
    classifier = digits.load_classifier(args.checkpoint if args.model == "digits" else None)
    _, images, _, settings, seconds = _sample_fp(args)
    report = quality_report(classifier, images).to_dict()
    report["sampling"] = {**settings, "seconds": seconds}
    write_json_atomic(out / "quality.json", {**report, "provenance": provenance(args.device)})
    _print_quality(report)
    print(f"-> {out / 'quality.json'}")
    if args.require_pass and not report["passes"]:
        return 1
    return 0


def _print_quality(q: dict) -> None:
    s, h = q["samples"], q["heldout"]
    print(f"samples: {q['n_samples']}   quality bar: {'PASS' if q['passes'] else 'FAIL'}")
    print(f"  FD(samples, held-out A) = {q['fd_samples_vs_heldout']:.3f}   FD(held-out B, held-out A) = "
          f"{q['fd_real_vs_heldout']:.3f}   ratio = {q['fd_ratio']:.2f} (limit {q['criteria']['fd_ratio_limit']}, "
          f"{q['n_fd']} images per set)")
    print(f"  confident (max softmax >= {q['criteria']['confident_threshold']}): samples {s['confident_rate']:.3f}"
          f"   held-out {h['confident_rate']:.3f}")
    print(f"  mean max softmax: samples {s['mean_max_softmax']:.3f}   held-out {h['mean_max_softmax']:.3f}")
    print(f"  classifier-IS: samples {q['is_samples'][0]:.2f} +- {q['is_samples'][1]:.2f}"
          f"   held-out B {q['is_real'][0]:.2f} +- {q['is_real'][1]:.2f}")
    print(f"  class histogram: samples {s['class_histogram']}   held-out {h['class_histogram']}")


def cmd_train_tiny(args) -> int:
    from modiff.samplers import MAX_SEED

    from .train import ClassifierTrainConfig, EvalConfig, UNetTrainConfig, train_tiny
    from .zoo import digits

    if args.install and args.no_eval:
        raise BenchError("--install replaces the packaged model only after it passes the quality bar; drop --no-eval")
    if not 0 <= args.seed <= MAX_SEED:
        raise BenchError(f"--seed must be between 0 and 2^64 - 1, got {args.seed}")
    check_out_dir(args.out)
    unet_cfg = UNetTrainConfig(seed=args.seed)
    clf_cfg = ClassifierTrainConfig(seed=args.seed)
    if args.unet_steps:
        unet_cfg.steps = args.unet_steps
    if args.classifier_epochs:
        clf_cfg.epochs = args.classifier_epochs
    out = Path(args.out)
    manifest = train_tiny(out, unet_cfg, clf_cfg, None if args.no_eval else EvalConfig(),
                          progress=not args.no_progress)
    print(f"classifier held-out accuracy: {manifest['classifier']['heldout_accuracy']:.4f}")
    print(f"UNet: {manifest['unet']['parameters']} parameters, final loss "
          f"{manifest['unet']['loss_curve'][-1]['loss']:.4f}, {manifest['unet']['train_seconds']:.0f} s")
    if "quality" not in manifest:
        print(f"-> {out} (not evaluated)")
        return 0
    _print_quality(manifest["quality"])
    print(f"-> {out}")
    if not manifest["quality"]["passes"]:
        print("modiff-bench: the retrained model does not meet the quality bar", file=sys.stderr)
        return 1
    if args.install:
        for sub in ("unet", "classifier"):
            shutil.rmtree(digits.ASSET_DIR / sub, ignore_errors=True)
            shutil.copytree(out / sub, digits.ASSET_DIR / sub)
        shutil.copy2(out / "manifest.json", digits.ASSET_DIR / "manifest.json")
        print(f"installed into {digits.ASSET_DIR}")
    return 0


def cmd_train_dit(args) -> int:
    from modiff.samplers import MAX_SEED

    from .train import DEFAULT_DIT_EVAL, DiTTrainConfig, train_dit_checkpoint
    from .zoo import digits_dit

    if args.install and args.no_eval:
        raise BenchError("--install replaces the packaged model only after it passes the quality bar; drop --no-eval")
    if not 0 <= args.seed <= MAX_SEED:
        raise BenchError(f"--seed must be between 0 and 2^64 - 1, got {args.seed}")
    check_out_dir(args.out)
    cfg = DiTTrainConfig(seed=args.seed)
    if args.steps:
        cfg.steps = args.steps
    out = Path(args.out)
    manifest = train_dit_checkpoint(out, cfg, None if args.no_eval else DEFAULT_DIT_EVAL,
                                    progress=not args.no_progress)
    net = manifest["transformer"]
    print(f"DiT: {net['parameters']} parameters, final loss {net['loss_curve'][-1]['loss']:.4f}, "
          f"{net['train_seconds']:.0f} s")
    if "quality" not in manifest:
        print(f"-> {out} (not evaluated)")
        return 0
    quality = manifest["quality"]
    print(f"guidance scale {quality['sampling']['guidance_scale']}: "
          f"{quality['class_accuracy']['accuracy']:.3f} of the samples classified as their class")
    _print_quality(quality)
    for row in quality["guidance_sweep"]:
        print(f"  guidance {row['guidance_scale']}: {'PASS' if row['passes'] else 'FAIL'}, FD ratio "
              f"{row['fd_ratio']:.2f}, confident {row['confident_rate']:.3f}, "
              f"class accuracy {row['class_accuracy']:.3f}")
    print(f"-> {out}")
    if not quality["passes"]:
        print("modiff-bench: the retrained model does not meet the quality bar", file=sys.stderr)
        return 1
    if args.install:
        shutil.rmtree(digits_dit.ASSET_DIR / "transformer", ignore_errors=True)
        shutil.copytree(out / "transformer", digits_dit.ASSET_DIR / "transformer")
        shutil.copy2(out / "manifest.json", digits_dit.ASSET_DIR / "manifest.json")
        print(f"installed into {digits_dit.ASSET_DIR}")
    return 0


def cmd_run(args) -> int:
    from .devices import pick_device
    from .distributed import init_from_env, shutdown
    from .matrix import load_matrix
    from .runner import Runner

    matrix = load_matrix(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    check_out_dir(out, probe=not (args.dry_run or args.estimate))
    check_run_dir(out, args.force)
    pick_device(args.device, here=args.launcher == "local")  # --dry-run too: a typo stops here, not on a node
    for warning in matrix.warnings if os.environ.get("RANK", "0") == "0" else ():  # once under torchrun
        print(f"modiff-bench: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        import json

        from .cell import later_settings
        from .matrix import cell_id
        from .params import toml_value

        def flat(cell) -> dict[str, object]:
            return {f"{m}.{k}": v for m, values in sorted(cell.params.items()) for k, v in sorted(values.items())}

        seen: dict[str, set] = {}
        for cell in matrix.cells:
            for key, value in flat(cell).items():
                seen.setdefault(key, set()).add(json.dumps(value, sort_keys=True))
        varied = {key for key, values in seen.items() if len(values) > 1}  # swept or set per block
        for cell in matrix.cells:
            shown = "".join(f"  {key}={toml_value(value)}" for key, value in flat(cell).items() if key in varied)
            later = "".join(f" {value}" for value in later_settings(vars(cell)))
            print(f"{cell_id(cell)}  {cell.model} {cell.sampler} {cell.steps} steps  {cell.method} "
                  f"W{cell.w_bits}A{cell.a_bits} {cell.a_granularity}{later}{shown}")
        for skip in matrix.skipped:
            print(f"skipped: {skip}")
        print(f"{len(matrix.cells)} cells, {len(matrix.skipped)} combinations skipped -> {out}")
        return 0
    if args.launcher == "submitit":
        from .launch import LaunchOptions, parse_extra, submit

        options = LaunchOptions(
            partition=args.slurm_partition, cluster=args.submitit_cluster, gpus_per_task=args.gpus_per_task,
            cpus_per_task=args.cpus_per_task, cells_per_task=args.cells_per_task, time_min=args.slurm_time,
            array_parallelism=args.array_parallelism, account=args.slurm_account, qos=args.slurm_qos,
            extra=parse_extra(args.slurm_param), wait=args.wait)
        runner = Runner(matrix, out, device="auto" if args.device.startswith("cuda") else args.device,
                        force=args.force, progress=False, argv=args.argv)
        return submit(args.config, args.overrides, out, args.device, options, runner)
    world, device = init_from_env(args.device)
    try:
        runner = Runner(matrix, out, device=device, force=args.force, progress=not args.no_progress,
                        argv=args.argv, world=world)
        if args.estimate:
            if world.main:
                runner.store.check()
                runner.load_models()
                todo = runner.pending()
                print(_estimate_line(runner, todo) if todo else f"nothing to run: every cell of {out} is finished")
            return 0
        summary = runner.run(before=lambda todo: print(_estimate_line(runner, todo), flush=True))
    finally:
        shutdown(world)
    if not world.main:
        return 1 if summary.failed else 0
    print(f"{summary.total} cells: {summary.ran} run, {summary.reused} already finished, "
          f"{len(summary.failed)} failed, {summary.skipped} invalid combinations skipped, "
          + (f"{len(summary.held)} skipped: held by another runner, " if summary.held else "")
          + f"{summary.seconds:.0f} s -> {summary.out / 'results.csv'}")
    failed = [key for key in summary.failed if key not in summary.unevaluated]
    if failed:
        print(f"modiff-bench: {len(failed)} cell(s) failed: {', '.join(failed)} "
              f"(errors in the 'error' column and in cells/<id>/error.txt)", file=sys.stderr)
    if summary.unevaluated:
        print(f"modiff-bench: {len(summary.unevaluated)} cell(s) sampled but a metric failed: "
              f"{', '.join(summary.unevaluated)} (reasons in the 'missing_metrics' column; the next run or "
              f"'modiff-bench evaluate {summary.out}' tries again)", file=sys.stderr)
    if summary.held:
        print(f"modiff-bench: {len(summary.held)} skipped: held by another runner ({', '.join(summary.held)}); "
              "they are not done yet: run the command again once that runner ends", file=sys.stderr)
    if summary.failed:
        return 1
    return HELD_ELSEWHERE if summary.held else 0


HELD_ELSEWHERE = 3  # exit status of a 'run' that left cells to another runner sharing its directory


def _estimate_line(runner, todo) -> str:
    """The estimate, or why there is none: measuring must never stop the run it describes."""
    from .estimate import estimate

    cells = [cell for _, cell in todo]
    try:
        return estimate(cells, runner.models, runner.device, runner.world.size).describe(runner.device)
    except Exception as exc:  # e.g. out of memory at the measuring batch size: the cells will say more
        first = (str(exc).strip().splitlines() or [""])[0]
        return f"estimate: not available ({type(exc).__name__}: {first})"


def cmd_presets(args) -> int:
    from .matrix_file import presets

    for name, description in presets().items():
        print(f"{name:12s} {description}")
    return 0


def cmd_methods(args) -> int:
    from .params import toml_value
    from .plugins import import_plugins
    from .registry import methods

    import_plugins(args.imports)
    for kind, title in (("base", "base quantizers (matrix.base)"), ("cache", "cache schemes (matrix.cache)")):
        print(f"{title}:")
        entries = methods(kind)
        if kind == "cache":
            print(f"  {'none':12s} no caching")
        for name, cls in entries.items():
            params = ", ".join(f"{k}={'unset' if v is None else toml_value(v)}" for k, v in cls.PARAMS.items())
            also = f" (also: {', '.join(cls.aliases)})" if cls.aliases else ""
            print(f"  {name:12s} {cls.summary()}{also}" + (f"  [params: {params}]" if params else ""))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    out = Path(args.dir)
    if not (out / "run.json").exists() and not out.is_dir():
        raise BenchError(f"{out} is not a run directory (no such directory)")
    check_out_dir(out)
    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    recompute = [n.strip() for n in args.recompute.split(",") if n.strip()]
    done, busy, bad = evaluate_run(out, names, args.device, progress=not args.no_progress and sys.stderr.isatty(),
                                   argv=args.argv, imports=args.imports, recompute=recompute)
    print(f"{done} cell(s) evaluated, {busy} held by another process, {len(bad)} not evaluated -> "
          f"{out / 'results.csv'}")
    if bad:
        print(f"modiff-bench: {len(bad)} cell(s) could not be evaluated: {', '.join(bad)} (damaged samples are "
              "generated again by 'modiff-bench run'; metric errors are in missing_metrics)", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from reports.render import build_report

    if args.out is not None:
        check_out_dir(args.out)
    elif len(args.dirs) == 1 and Path(args.dirs[0]).is_dir():
        check_out_dir(args.dirs[0])
    html, md = build_report(args.dirs, args.out, imports=args.imports)
    print(f"report: {html}\n        {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command in ("run", "sample", "quality", "evaluate", "train-tiny", "train-dit"):
        # before any model is built: every cell, full precision included, is timed under the same allocator
        # (modiff/allocator.py; MODIFF_ALLOCATOR=default leaves glibc's as it comes); each cell's timing_env says which
        from modiff.allocator import tune_allocator

        try:
            tune_allocator()
        except ValueError as exc:
            print(f"modiff-bench: error: {exc}", file=sys.stderr)
            return 2
    handler = {"models": cmd_models, "sample": cmd_sample, "quality": cmd_quality, "train-tiny": cmd_train_tiny,
               "train-dit": cmd_train_dit,
               "run": cmd_run, "presets": cmd_presets, "methods": cmd_methods, "evaluate": cmd_evaluate,
               "report": cmd_report}[args.command]
    terminated = []

    def on_sigterm(signum, frame):  # SLURM, timeout, kill: leave the state Ctrl-C leaves
        terminated.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: nothing to install
        previous = None
    try:
        return handler(args)
    except BenchError as exc:
        print(f"modiff-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modiff-bench: interrupted" + (" (SIGTERM)" if terminated else ""), file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, not the user: exit status 1
            where = f" while writing {exc.filename}" if exc.filename else ""
            print(f"modiff-bench: error: no space left on device{where}", file=sys.stderr)
            return 1
        if exc.errno in USER_OS_ERRORS:
            where = f" {exc.filename}" if exc.filename else ""
            print(f"modiff-bench: error: cannot access{where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# what a path the user chose can do: read-only file system, permissions, a file where a directory belongs
USER_OS_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ENOENT,
                  errno.ENAMETOOLONG, errno.EEXIST)


def entry() -> None:
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # output piped into a reader that stopped early ('| head'): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    entry()
