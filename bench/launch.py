"""Run a matrix on a SLURM cluster through submitit: one job array, a group of cells per task.

    modiff-bench run cifar10-paper --out /shared/runs/c10 --launcher submitit \\
        --slurm-partition gpu --gpus-per-task 4 --cells-per-task 2 --slurm-time 720

Rank 0 of this command sets up the output directory (run.json) and submits the array; every task
loads the same matrix, runs its cells through the ordinary :class:`bench.runner.Runner` (restricted to
its cell ids) and writes each finished cell atomically into the shared directory. With
``--gpus-per-task G`` > 1 a task is G processes on one node, joined into a torch.distributed group by
submitit's ``TorchDistributedEnvironment``, which shard every cell's seeds exactly as ``torchrun`` does.
Per-cell locks keep two tasks (or a resubmission while tasks still run) off the same cell; the results
tables are rebuilt from the cell files by every task and, with ``--wait``, once more at the end.
``--submitit-cluster local`` runs the tasks as local processes (what the tests use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import BenchError


@dataclass
class LaunchOptions:
    partition: str | None = None
    cluster: str | None = None  # None: SLURM if available (submitit's AutoExecutor); "local" / "debug"
    gpus_per_task: int = 1
    cpus_per_task: int = 8
    cells_per_task: int = 1
    time_min: int = 24 * 60
    array_parallelism: int = 64
    account: str | None = None
    qos: str | None = None
    extra: dict = field(default_factory=dict)  # more submitit parameters (slurm_* keys)
    wait: bool = False


@dataclass
class TaskSpec:
    """What one array task needs; re-resolves the matrix itself (plugins are imported in the task)."""

    config: str
    overrides: list[str]
    out: str
    cell_ids: list[str]
    device: str
    processes: int


def run_task(spec: TaskSpec) -> dict:
    """The body of one array task (runs on the cluster node)."""
    from .distributed import init_from_env, shutdown
    from .matrix import load_matrix
    from .runner import Runner

    if spec.processes > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    device = spec.device
    if spec.processes > 1 and device == "auto":
        device = "cuda" if _cuda() else "cpu"
    world, device = init_from_env(device)
    try:
        matrix = load_matrix(spec.config, spec.overrides)
        summary = Runner(matrix, spec.out, device=device, progress=False, world=world,
                         only=set(spec.cell_ids)).run()
    finally:
        shutdown(world)
    return {"rank": world.rank, "ran": summary.ran, "failed": summary.failed}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def submit(config: str, overrides: list[str], out: Path, device: str, options: LaunchOptions, runner,
           log=print) -> int:
    """Submit the pending cells of ``runner`` as a job array; returns the exit status."""
    try:
        import submitit
    except ImportError:
        raise BenchError("--launcher submitit needs submitit: pip install 'modiff-bench[cluster]'") from None
    if options.cells_per_task < 1 or options.gpus_per_task < 1:
        raise BenchError("--cells-per-task and --gpus-per-task must be >= 1")
    if options.cluster in (None, "slurm") and not options.partition:
        raise BenchError("--launcher submitit needs --slurm-partition (or --submitit-cluster local to test)")
    with runner.store.open():
        runner.prepare()
    pending = [key for key, _ in runner.pending()]
    if not pending:
        log(f"nothing to submit: all {len(runner.ids)} cells of {out} are finished")
        return 0
    groups = [pending[i: i + options.cells_per_task] for i in range(0, len(pending), options.cells_per_task)]
    executor = submitit.AutoExecutor(folder=str(out / "slurm" / "%j"), cluster=options.cluster)
    params = {"timeout_min": options.time_min, "nodes": 1, "tasks_per_node": options.gpus_per_task,
              "cpus_per_task": options.cpus_per_task, "name": f"modiff-bench-{out.name}",
              "slurm_array_parallelism": options.array_parallelism}
    if device != "cpu":
        params["gpus_per_node"] = options.gpus_per_task
    if options.partition:
        params["slurm_partition"] = options.partition
    if options.account:
        params["slurm_account"] = options.account
    if options.qos:
        params["slurm_qos"] = options.qos
    params.update(options.extra)
    executor.update_parameters(**params)
    specs = [TaskSpec(config=_portable(config), overrides=list(overrides), out=str(out.resolve()), cell_ids=group,
                      device=device, processes=options.gpus_per_task) for group in groups]
    jobs = executor.map_array(run_task, specs)
    log(f"submitted {len(jobs)} task(s) for {len(pending)} cell(s) ({options.cells_per_task} per task, "
        f"{options.gpus_per_task} process(es) each): job {jobs[0].job_id.split('_')[0] if jobs else '?'}; "
        f"logs in {out / 'slurm'}")
    if not options.wait:
        log(f"when the array is done: 'modiff-bench run {config} --out {out}' rebuilds the tables (and reruns "
            "any failed cell); 'modiff-bench report' renders them")
        return 0
    failed: list[str] = []
    for job in jobs:
        try:
            results = job.results()
        except Exception as exc:  # a task that died: its cells are not finished; a rerun retries them
            log(f"task {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
            failed.append(job.job_id)
            continue
        for result in results:
            failed.extend(result["failed"])
    with runner.store.open():
        runner.store.write_tables()
    left = [key for key, _ in runner.pending()]
    log(f"array done: {len(pending) - len(left)} of {len(pending)} cell(s) finished -> {out / 'results.csv'}")
    return 1 if failed or left else 0


def _portable(config: str) -> str:
    """A matrix file path as seen from the nodes (absolute); preset names stay names."""
    path = Path(config)
    return str(path.resolve()) if path.suffix == ".toml" and path.exists() else config


def parse_extra(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs for submitit's update_parameters (values as int when they look like one)."""
    extra = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--slurm-param expects KEY=VALUE, got {item!r}")
        extra[key if key.startswith("slurm_") else f"slurm_{key}"] = int(value) if value.isdigit() else value
    return extra
