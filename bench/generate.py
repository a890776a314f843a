"""Generating one cell: build its method, sample its seeds, write its samples and generation record.

The only step that needs the ranks of a ``torchrun`` run to work together (see ``bench.distributed``).
Sampling is chunked the NVlabs/edm way: chunk k of a cell is seeds[k*B:(k+1)*B] (B = batch_size),
written to ``chunks/`` as soon as it is sampled, and chunks already on disk are not sampled again, so
an interrupted cell resumes mid-way. Rank r samples the chunks k with k % world_size == r; rank 0
assembles ``samples.pt`` once all exist and writes the generation record: the cell's settings, costs
(wall-clock, memory, MACs, GBops), method info, per-step trace and provenance, as ``result.json``
with no metrics yet (``bench.evaluate`` adds them).

Samples are checked as stored: float16 that overflows (beyond +-65504), or NaN/Inf in the sampler's
output or in a latent model's decoded images, fails the cell. A full disk (ENOSPC, EDQUOT) is not a
cell's failure: the OSError, its ``filename`` the file being written, leaves the run and nothing is
recorded, so the rerun after freeing space resumes where the run stopped.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import modiff
from modiff.flow import FlowSamplerConfig
from modiff.layers import QuantLayer
from modiff.samplers import NoiseStd, SamplerConfig, sample

from .build import build
from .cell import CellSpec, fp_reference_cell, is_compiled
from .context import Prepared
from .distributed import World
from .errors import BenchError
from .matrix import Matrix, resolve, sampler_mismatch, trace_layer
from .measure import measured
from .provenance import git_revision, is_disk_full, package_versions, save_torch_atomic, timing_environment
from .registry import method_versions
from .store import RESULT_COLUMNS, Cell, RunStore, now, one_line, read_chunk
from .zoo import ZooModel

FLOAT16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class SampleRecord:
    images: torch.Tensor  # float16, CPU, the decoded sampler output, unclipped (nominally [-1, 1])
    seeds: list[int]
    seconds: float  # sampling, summed over chunks (device-seconds when several ranks sampled)
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    state_bytes: int
    decode_seconds: float = 0.0  # latent models: the autoencoder's decoding, not in ``seconds``
    # every timed batch, [images, seconds]: each chunk once, and the first chunk ``timing_repeats - 1`` more times
    batch_seconds: list = field(default_factory=list)
    # adaptive caching (residual_tolerance): layer -> fraction of its checked residual samples that reused the cache
    reused: dict = field(default_factory=dict)


class RankFailed(RuntimeError):
    """A collective step failed on some rank; raised on every rank so that none waits forever."""

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


def together(world: World, fn: Callable[[], object]) -> object:
    """Run ``fn`` on every rank; if it raised anywhere, raise on every rank (no rank is left waiting
    in a collective). Alone, exceptions pass through untouched."""
    if not world.distributed:
        return fn()
    result, failure = None, None
    try:
        result = fn()
    except Exception as exc:  # reported to every rank below
        failure = (world.rank, one_line(exc), traceback.format_exc(),
                   str(exc) if isinstance(exc, BenchError) else None,
                   (exc.errno, exc.strerror, exc.filename) if is_disk_full(exc) else None)
    failures = [f for f in world.gather(failure) if f is not None]
    if failures:
        full = [f[4] for f in failures if f[4] is not None]
        if full:  # a full disk is no cell's failure: every rank stops with it
            raise OSError(*full[0])
        rank, message, details, user_error, _ = failures[0]
        if user_error is not None:  # a user mistake stays one line and exit status 2 on every rank
            raise BenchError(user_error)
        raise RankFailed(f"rank {rank}: {message}", details)
    return result


def stop_if_disk_full(world: World, error: OSError | None) -> None:
    """Raise ``error`` (a full disk) out of the run, on every rank when any rank met one."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    found = [f for f in world.gather(None if error is None else (error.errno, error.strerror, error.filename))
             if f is not None]
    if error is not None:
        raise error
    if found:
        raise OSError(*found[0])


def reused_fractions(parts: list[dict]) -> dict[str, float]:
    """Per layer, the fraction of its checked residual samples that reused the cached output, over every chunk
    (``modiff.reused_samples`` of each: ``name -> [reused, checked]``); independent of how chunks were shared."""
    totals: dict[str, list[int]] = {}
    for part in parts:
        for name, (reused, checked) in part.items():
            total = totals.setdefault(name, [0, 0])
            total[0] += int(reused)
            total[1] += int(checked)
    return {name: reused / checked for name, (reused, checked) in totals.items() if checked}


def is_fp_reference_cell(cell: CellSpec) -> bool:
    """The full-precision, uncached, uncompiled cell: its samples are the shared reference file (a
    compiled one keeps its own samples: compilation may reorder float arithmetic)."""
    return cell.base == "fp" and cell.cache == "none" and not is_compiled(vars(cell))


class Generator:
    """Generates cells of one run directory on this rank (every rank builds its own)."""

    def __init__(self, store: RunStore, models: dict[str, ZooModel], device: torch.device, world: World,
                 progress: bool = False, trace_layer: str | dict[str, str] = "", trace_samples: int = 1,
                 needs_fp_reference: bool = False, timing_repeats: int = 1):
        self.store = store
        self.matrix: Matrix = store.matrix  # its cells resolved (bench.matrix.Matrix.resolution)
        self.models = models
        self.device = device
        self.world = world
        self.progress = progress
        self.trace_layer = trace_layer
        self.trace_samples = trace_samples
        self.timing_repeats = timing_repeats  # timed samplings of a cell's first batch (a spread, not one number)
        self.needs_fp_reference = needs_fp_reference  # some metric compares with the full-precision samples
        self._macs: dict[str, object] = {}

    def fp_reference_path(self, cell: CellSpec) -> Path:
        return self.store.fp_reference_path(cell, self.device.type)

    # -- one cell --------------------------------------------------------------------------
    def generate(self, cell: Cell) -> tuple[dict | None, SampleRecord | None]:
        """Generate one cell on every rank; rank 0 returns its generation record (the row, written as
        its result.json) and the samples (other ranks: None, None)."""
        spec = cell.spec
        if self.world.main:
            cell.clear()
        self.world.barrier()
        row = self._base_row(cell.key, spec)
        model = self.models[spec.model]
        disk_full: OSError | None = None
        record = None
        try:
            # collective steps first (every rank takes part), then rank 0's own work: a failure in the
            # latter never leaves the other ranks waiting in a collective
            resolved = self.matrix.resolution(spec)
            sampler = resolved.sampler
            is_fp_reference = is_fp_reference_cell(spec)
            if is_fp_reference:
                record, row["prepare_s"] = self.fp_reference(spec), 0.0
            else:
                t0 = time.perf_counter()

                def make() -> Prepared:
                    return build(resolved, model, self.device, self.progress, self.store.out / "cache")

                # rank 0 first: what it calibrates and caches, the other ranks then load
                prepared = together(self.world, lambda: make() if self.world.main else None)
                prepared = together(self.world, lambda: prepared if self.world.main else make())
                row["prepare_s"] = time.perf_counter() - t0
                record = self._sample_chunks(prepared, model, spec, sampler, cell.key, cell.chunk_dir)
            if self.needs_fp_reference:
                self.fp_reference(fp_reference_cell(spec), load=False)
            if self.world.main and is_fp_reference:
                path = self.fp_reference_path(spec)
                row["samples_file"] = cell.relative(path)
                row["samples_bytes"], row["samples_sha256"] = self.store.fp_reference_digest(path)
            elif self.world.main:
                row["samples_bytes"], row["samples_sha256"] = cell.write_samples(record.images, record.seeds)
                trace = self._trace(prepared, model, spec, sampler)
                if trace is not None:
                    row["trace_file"] = cell.write_trace(trace)
                row["samples_file"] = cell.relative(cell.samples_path)
            if self.world.main:
                row.update(self._costs(spec, model, record, 1.0 if is_fp_reference else prepared.mac_fraction))
                if not is_fp_reference:
                    row["method_info"] = prepared.info
                row["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failing cell is recorded and the run goes on
            if is_disk_full(exc):  # the disk is full, not the method: stop the run, record nothing
                disk_full = exc
            else:
                row["status"] = "failed"
                row["error"] = str(exc) if isinstance(exc, RankFailed) else one_line(exc)
                record = None
                if self.world.main:
                    details = exc.details if isinstance(exc, RankFailed) else traceback.format_exc()
                    try:
                        cell.write_error(details)
                    except OSError as failed_write:
                        if not is_disk_full(failed_write):
                            self.store.log(f"could not write {cell.dir / 'error.txt'}: {failed_write}")
                        else:
                            failed_write.__cause__ = exc
                            disk_full = failed_write
        stop_if_disk_full(self.world, disk_full)  # (also the barrier: every rank finished the cell)
        if not self.world.main:
            return None, None
        row["generated_utc"] = row["finished_utc"] = now()
        cell.write_result(row)
        return row, record

    def _base_row(self, key: str, cell: CellSpec) -> dict:
        versions = package_versions()
        row = {c: None for c in RESULT_COLUMNS}
        row.update({"cell_id": key, "status": "running", "error": "", **asdict(cell), "method": cell.method,
                    "device": str(self.device), "world_size": self.world.size, "torch_version": versions["torch"],
                    "git_rev": git_revision(), "modiff_bench_version": versions["modiff-bench"],
                    "started_utc": now(), "versions": versions, "missing_metrics": {}, "metrics": [],
                    "timing_env": timing_environment(str(self.device), cell.memory_format, is_compiled(vars(cell))),
                    "method_versions": method_versions(asdict(cell))})
        return row

    # -- the full-precision reference -------------------------------------------------------
    def fp_reference(self, cell: CellSpec, load: bool = True) -> SampleRecord | None:
        """Full-precision samples for the cell's model, sampler and seeds: made once (by every rank,
        chunk by chunk), then reused. Rank 0 gets the record (unless ``load`` is False: then None, and an
        existing file checked before is not loaded again), the other ranks None. A file that is not a
        valid reference of these seeds (truncated, garbled, other seeds, NaN/Inf, not the file the
        full-precision cell recorded) is made again, with a note in the log, and the full-precision
        cell that recorded the old file runs again."""
        path = self.fp_reference_path(cell)
        store = self.store
        model = self.models[cell.model]
        lock = store.fp_reference_lock(path) if self.world.main else None
        if lock is not None:
            lock.__enter__()
        try:
            data = None
            if self.world.main and path.is_file():
                data, reason = store.check_fp_reference(cell, path, model.image_output_shape)
                if reason is not None:  # the tool's own file, damaged: make it again
                    store.log(f"{path.relative_to(store.out)} is not a valid reference of its cells ({reason}); "
                              "regenerating it")
                    path.unlink(missing_ok=True)
            if self.world.broadcast(path.is_file() if self.world.main else None):
                if not self.world.main or not load:
                    return None
                if data is None:  # checked before by this process: loaded only when the record is needed
                    data = store.load_fp_reference(path)
                return SampleRecord(**{k: v for k, v in data.items() if k in SampleRecord.__dataclass_fields__})
            fp_cell = CellSpec(**{**asdict(cell), "base": "fp", "cache": "none", "modulation": "off", "w_bits": 32,
                                  "a_bits": 32, "a_granularity": "none", "params": {}, "execution": "fake"})
            resolved = resolve(fp_cell)
            prepared = build(resolved, model, self.device)
            record = self._sample_chunks(prepared, model, fp_cell, resolved.sampler, path.stem,
                                         path.with_suffix(".chunks"))
            # (collective, so that a failed write stops every rank alike)
            together(self.world, lambda: store.save_fp_reference(path, asdict(record)) if self.world.main else None)
            return record
        finally:
            if lock is not None:
                lock.__exit__(None, None, None)

    # -- sampling ----------------------------------------------------------------------------
    def _sample_chunks(self, prepared: Prepared, model: ZooModel, cell: CellSpec,
                       sampler: SamplerConfig | FlowSamplerConfig, tag: str, chunk_dir: Path) -> SampleRecord | None:
        """Sample this rank's missing chunks (chunk k = seeds[k*B:(k+1)*B], rank k % world_size) into
        ``chunk_dir``; once every rank is done, rank 0 returns the whole cell's record."""
        seeds = list(cell.seeds)
        size = cell.batch_size
        chunks = [seeds[i: i + size] for i in range(0, len(seeds), size)]
        paths = [chunk_dir / f"chunk-{k:06d}.pt" for k in range(len(chunks))]

        def work() -> None:
            todo = [k for k in range(len(chunks)) if self.world.owns(k) and read_chunk(paths[k], tag, chunks[k])
                    is None]
            if not todo:
                return
            chunk_dir.mkdir(parents=True, exist_ok=True)
            denoiser = prepared.denoiser()
            self._warm_up(prepared, denoiser, model, cell, sampler)
            desc = cell.label if cell.base != "fp" else f"full precision {cell.dtype}".removesuffix(" float32")
            for k in tqdm(todo, desc=desc, unit="batch", disable=not self.progress, leave=False):
                def run(k=k):
                    return sample_model(denoiser, model, sampler, chunks[k], size, self.device,
                                        prepared.start_trajectory, prepared.noise_std)

                images, m = measured(run, self.device)
                reused = {name: list(counts) for name, counts in modiff.reused_samples(prepared.unet).items()}
                # the same batch again (same seeds, same work): a spread for the timing, not one sequential number
                repeats = [measured(run, self.device)[1].seconds for _ in range(self.timing_repeats - 1)] \
                    if k == 0 else []
                bad = int((~images.isfinite().flatten(1).all(dim=1)).sum())
                if bad:
                    raise FloatingPointError(f"samples contain NaN/Inf ({bad} of {len(images)} images, seeds "
                                             f"{chunks[k][0]}-{chunks[k][-1]})")
                state = modiff.state_bytes(prepared.unet)
                decode_start = time.perf_counter()
                if model.decoder is not None:
                    images = model.decode(images.to(self.device)).cpu()
                    bad = int((~images.isfinite().flatten(1).all(dim=1)).sum())
                    if bad:
                        raise FloatingPointError(f"decoded images contain NaN/Inf ({bad} of {len(images)} images, "
                                                 f"seeds {chunks[k][0]}-{chunks[k][-1]})")
                decode_seconds = time.perf_counter() - decode_start
                stored = to_float16(images, chunks[k])
                data = {"images": stored, "seeds": chunks[k], "tag": tag, "seconds": m.seconds,
                        "decode_seconds": decode_seconds, "peak_rss_bytes": m.peak_rss_bytes,
                        "cuda_peak_bytes": m.cuda_peak_bytes, "state_bytes": state, "rank": self.world.rank,
                        "batch_seconds": [[len(chunks[k]), s] for s in (m.seconds, *repeats)], "reused": reused}
                save_torch_atomic(paths[k], data)

        def assemble() -> SampleRecord | None:
            if not self.world.main:
                return None
            parts = [read_chunk(path, tag, chunk) for path, chunk in zip(paths, chunks, strict=True)]
            if any(part is None for part in parts):
                raise RuntimeError(f"chunks missing in {chunk_dir} after sampling")
            cuda = [p["cuda_peak_bytes"] for p in parts if p["cuda_peak_bytes"] is not None]
            return SampleRecord(
                images=torch.cat([p["images"] for p in parts]), seeds=seeds,
                seconds=float(sum(p["seconds"] for p in parts)),
                peak_rss_bytes=max(p["peak_rss_bytes"] for p in parts), cuda_peak_bytes=max(cuda) if cuda else None,
                state_bytes=max(p["state_bytes"] for p in parts),
                decode_seconds=float(sum(p["decode_seconds"] for p in parts)),
                batch_seconds=[t for p in parts for t in p.get("batch_seconds", [[len(p["seeds"]), p["seconds"]]])],
                reused=reused_fractions([p.get("reused") or {} for p in parts]))

        together(self.world, work)
        return together(self.world, assemble)

    def _warm_up(self, prepared: Prepared, denoiser, model: ZooModel, cell: CellSpec,
                 sampler: SamplerConfig | FlowSamplerConfig) -> None:
        """Untimed: two denoiser calls at the batch size (allocator, kernel selection, caches)."""
        n = min(cell.batch_size, cell.n_samples)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((n, *model.image_shape), generator=generator).to(self.device)
        t = timestep_batch(model, sampler.evaluation_timesteps(model.schedule)[0], n, self.device)
        if model.start_batch is not None:
            model.start_batch(list(cell.seeds)[:n])
        prepared.start_trajectory()
        with torch.no_grad():
            for _ in range(2):
                denoiser(x, t)

    def _trace(self, prepared: Prepared, model: ZooModel, cell: CellSpec,
               sampler: SamplerConfig | FlowSamplerConfig) -> dict | None:
        """Paper Fig. 3: per step, the relative L2 error of one layer's output against the same
        layer (same, possibly quantized, weights) with float activations on the same input, over
        an untimed pass on the first ``trace_samples`` seeds. It isolates the activation error
        that modulation and error compensation act on."""
        name = trace_layer({"trace_layer": self.trace_layer}, cell.model)
        layer = dict(prepared.unet.named_modules()).get(name) if name else None
        if not isinstance(layer, QuantLayer):
            return None
        timesteps = sampler.evaluation_timesteps(model.schedule)
        errors: list[float | None] = [None] * len(timesteps)  # None: the layer did not run (caching)
        step = {"index": -1}

        def hook(module, inputs, output):
            reference = module.linear(inputs[0], bias=True)
            errors[step["index"]] = float((output - reference).norm() / reference.norm().clamp_min(1e-12))

        inner = prepared.denoiser()

        def denoiser(x, t):
            step["index"] += 1
            return inner(x, t)

        def start() -> None:
            step["index"] = -1
            prepared.start_trajectory()

        seeds = list(cell.seeds)[: self.trace_samples]
        handle = layer.register_forward_hook(hook)
        try:
            sample_model(denoiser, model, sampler, seeds, len(seeds), self.device, start, prepared.noise_std)
        finally:
            handle.remove()
        return {"layer": name, "timesteps": timesteps, "rel_l2": errors, "seeds": [seeds[0], seeds[-1]],
                "reference": "same layer, float activations, same input"}

    def _costs(self, cell: CellSpec, model: ZooModel, record: SampleRecord, mac_fraction: float | None = 1.0) -> dict:
        """Wall-clock, memory and compute. ``mac_fraction`` (caching) scales the MACs and GBops of the
        full UNet to the average step actually run; None (not known) leaves them empty."""
        out = self._compute_costs(cell, model, record, 1.0 if mac_fraction is None else mac_fraction)
        if mac_fraction is None:
            out.update(macs_g=None, gbops=None, gbops_honest=None)
        return out

    def _compute_costs(self, cell: CellSpec, model: ZooModel, record: SampleRecord, mac_fraction: float) -> dict:
        from modiff.accounting import gbops_honest, gbops_paper, reused_share

        if cell.model not in self._macs:
            self._macs[cell.model] = count_model_macs(model, self.device)
        report = self._macs[cell.model]
        out = {"macs_g": mac_fraction * report.total_macs / 1e9, "wall_s": record.seconds,
               "decode_s": record.decode_seconds,
               "img_per_s": cell.n_samples / record.seconds if record.seconds > 0 else None,
               **throughput_spread(record.batch_seconds),
               "peak_rss_mb": record.peak_rss_bytes / 2**20, "state_mb": record.state_bytes / 2**20,
               "cuda_peak_mb": None if record.cuda_peak_bytes is None else record.cuda_peak_bytes / 2**20}
        out["peak_mem_mb"] = out["cuda_peak_mb"] if out["cuda_peak_mb"] is not None else out["peak_rss_mb"]
        warmup = all(p.get("warmup", True) is not False for p in cell.params.values() if isinstance(p, dict))
        try:  # 0-bit activations (pure caching) have no paper convention
            out["gbops"] = mac_fraction * gbops_paper(report, cell.w_bits, cell.a_bits)
        except ValueError:
            out["gbops"] = None
        resolved = self.matrix.resolution(cell)
        calls = len(resolved.sampler.evaluation_timesteps(model.schedule))
        quantized_attention = resolved.base.quantizes_attention(cell)
        out["gbops_honest"] = mac_fraction * gbops_honest(
            report, cell.w_bits, cell.a_bits, calls, cell.modulation, execution=cell.execution,
            float_bits=16 if cell.dtype in ("bfloat16", "float16") else 32, warmup=warmup,
            attention_quantized=quantized_attention, reused=record.reused)
        out["reused_fraction"] = reused_share(report, record.reused) if record.reused else None
        return out


def sample_model(denoiser, model: ZooModel, sampler: SamplerConfig | FlowSamplerConfig, seeds: list[int],
                 batch_size: int, device: torch.device, on_trajectory_start: Callable[[], None] | None = None,
                 noise_std: NoiseStd | None = None) -> torch.Tensor:
    """Sample ``seeds`` of ``model`` with ``sampler`` (the DDPM family through ``modiff.samplers.sample``, the
    flow-matching samplers through ``FlowSamplerConfig.sample``), on the CPU in seed order. A sampler of the other
    kind than the model is a BenchError (one line)."""
    reason = sampler_mismatch(model.name, model.flow is not None, sampler.name)
    if reason is not None:
        raise BenchError(reason)
    if isinstance(sampler, FlowSamplerConfig):
        if noise_std is not None:
            raise ValueError(f"{sampler.name} adds no fresh noise: a method's noise std cannot apply to it")
        return sampler.sample(denoiser, model.schedule, seeds, model.image_shape, batch_size, device,
                              on_trajectory_start=on_trajectory_start, on_batch=model.start_batch)
    return sample(denoiser, model.schedule, sampler, seeds, model.image_shape, batch_size, device, progress=False,
                  on_trajectory_start=on_trajectory_start, noise_std=noise_std, on_batch=model.start_batch)


def timestep_batch(model: ZooModel, value: float, n: int, device: torch.device) -> torch.Tensor:
    """``n`` copies of the timestep ``value`` as the model's sampler passes them: float32 model times for a
    flow-matching model, integer timesteps (int64) for a DDPM-family one."""
    dtype = torch.float32 if model.flow is not None else torch.long
    return torch.full((n,), value, dtype=dtype, device=device)


def throughput_spread(batch_seconds: list) -> dict:
    """``img_per_s_lo`` / ``img_per_s_hi``: the slowest and fastest of the timed batches (images over
    seconds of each), and ``timed_batches``, how many there were: the spread beside ``img_per_s``."""
    rates = [n / s for n, s in batch_seconds if s > 0]
    return {"img_per_s_lo": min(rates) if rates else None, "img_per_s_hi": max(rates) if rates else None,
            "timed_batches": len(rates)}


def to_float16(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The samples as stored (float16), refused when that overflows: values beyond +-65504 in images
    nominally in [-1, 1] are a broken method, and storing float32 instead would double a 19.6 GB cell."""
    stored = images.to(torch.float16)
    bad = int((~stored.isfinite().flatten(1).all(dim=1)).sum())
    if bad:
        largest = float(images.abs().max())
        raise FloatingPointError(f"samples overflow float16, the storage format ({bad} of {len(images)} images "
                                 f"beyond +-{FLOAT16_MAX:.0f}, largest |value| {largest:.3g}; seeds "
                                 f"{seeds[0]}-{seeds[-1]})")
    return stored


def count_model_macs(model: ZooModel, device: torch.device):
    """MACs of one denoiser call on one image (on the doubled batch for classifier-free guidance); layers are named
    as in the UNet (what ``QuantLayer.name`` and ``modiff.reused_samples`` use)."""
    from modiff.accounting import MacReport, count_macs

    denoiser = model.denoiser()
    x = torch.zeros((1, *model.image_shape), device=device)
    t = timestep_batch(model, 0, 1, device)
    if model.start_batch is not None:
        model.start_batch([0])

    class Call(torch.nn.Module):  # count_macs hooks the modules of what it calls: the UNet inside
        def __init__(self):
            super().__init__()
            self.unet = model.unet

        def forward(self, x, t):
            return denoiser(x, t)

    counted = count_macs(Call(), x, t)
    return MacReport([dataclasses.replace(layer, name=layer.name.removeprefix("unet.")) for layer in counted.layers])
