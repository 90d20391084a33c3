"""Runs a comparison's cells as a graph of jobs, here or on a Ray cluster.

The graph: one job per shared source stage (a seed's, trained once) and one per cell (its
stages not finished yet), a cell after its source. Jobs whose predecessors are done run at
once, as many as the executor has slots:

  inline     ``compare.workers=1`` (the default): in this process, one after another.
  processes  ``compare.workers=N``: N worker processes (``concurrent.futures``) that stay
             alive across cells, each with its own torch threads (``compare.threads``;
             default: the cores divided among the workers) or its own GPU where there are
             several.
  ray        ``compare.executor=ray``: each job a Ray task with its resources (``threads``
             CPUs, one GPU on a GPU device), on a local Ray instance or the cluster at
             ``compare.ray_address`` (or RAY_ADDRESS).

A job is ``mtl.compare.train_cell``, which skips finished stages and resumes a stage from
its last checkpoint, so a job that is run again loses nothing: a worker that dies (killed,
out of memory) has its job rerun, up to ``RETRIES`` times. Ctrl-C (or any job's error) stops
every running job at its next step with a checkpoint; rerunning the command resumes the grid.
Only this process writes results.csv and the report; every stage logs to W&B from its worker,
in the comparison's group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mtl.config import ConfigError

# A job is rerun this many times after its worker died; a job that kills its worker every
# time (say, out of memory) then stops the grid instead of looping.
RETRIES = 2
LINES = 16  # running jobs shown one a line under the grid's bar (a cluster may run hundreds)
STOP_WAIT_S = 120  # how long stopped jobs may take to write their checkpoints before their workers are killed


@dataclass
class Job:
    key: str  # the folder it trains, relative to the comparison's output_dir
    cell: Any  # mtl.compare.Cell
    stages: list[int]  # indices of the cell's stages it trains
    after: list[str] = field(default_factory=list)  # keys of the jobs it waits for
    label: str = ""


def jobs(cells: list, root: Path) -> list[Job]:
    """The graph of the unfinished ``cells``: a shared source stage is its own job, once per
    folder (seed), before every cell that starts from it."""
    from mtl.compare import describe

    out: dict[str, Job] = {}
    for cell in cells:
        if (cell.dirs[-1] / "results.json").exists():
            continue
        after, first = [], 0
        if cell.shared_source:
            first = 1
            source = cell.dirs[0]
            if not (source / "results.json").exists():
                key = str(source.relative_to(root))
                after = [key]
                if key not in out:
                    out[key] = Job(key, cell, [0], label=f"source {'tune ' if cell.point else ''}seed={cell.seed}")
        key = str(cell.dirs[-1].relative_to(root))
        out[key] = Job(key, cell, list(range(first, len(cell.stages))), after, describe(cell))
    return list(out.values())


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gpu_count(cfg: DictConfig) -> int:
    """GPUs the cells would use: 0 on a CPU device."""
    from mtl.builders import resolve_device

    if resolve_device(cfg.device).type != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def check(cfg: DictConfig) -> None:
    """What the machine (or cluster) must offer for ``compare.workers``, ``threads`` and
    ``executor``, checked before anything trains."""
    from mtl import distributed

    c = cfg.compare
    workers, cores, gpus = c.workers or 1, available_cores(), gpu_count(cfg)
    if (workers > 1 or c.executor == "ray") and distributed.current().active:
        raise ConfigError("compare.workers: under torchrun every rank trains each cell together; run the grid's cells in parallel "
                          "(compare.workers, compare.executor=ray) or each cell on several processes (torchrun), not both.")
    if c.executor == "ray":
        ray_module(c)
        return
    if gpus > 1 and workers > gpus:
        raise ConfigError(f"compare.workers: {workers} workers, but {gpus} GPUs are visible (one per worker); set compare.workers <= {gpus}.")
    if gpus <= 1 and workers > cores:
        raise ConfigError(f"compare.workers: {workers} workers, but this machine has {cores} cores for them; set compare.workers <= {cores}"
                          f"{' (or device=cuda on a machine with several GPUs)' if not gpus else ''}.")
    if c.threads is not None and gpus <= 1 and workers * c.threads > cores:
        raise ConfigError(f"compare.threads: {workers} workers x {c.threads} threads exceed the {cores} cores; set compare.threads <= "
                          f"{max(1, cores // workers)} (or leave it unset: the cores divided among the workers).")


def threads_per_cell(cfg: DictConfig) -> int:
    c = cfg.compare
    return c.threads or max(1, available_cores() // (c.workers or 1))


class Inline:
    """Jobs in this process, one at a time: each ``submit`` runs its job before it returns."""

    slots = 1

    def __init__(self, cfg: DictConfig, root: Path):
        import torch

        self.cfg, self.root = cfg, root
        self.threads = torch.get_num_threads()  # restored by close(): this process outlives the grid (tests, notebooks)
        if cfg.compare.threads:
            torch.set_num_threads(cfg.compare.threads)

    def submit(self, job: Job, log) -> Future:
        from mtl.compare import roles, train_cell

        future: Future = Future()
        future.set_result(train_cell(self.cfg, job.cell, job.stages, roles(self.cfg)[0], self.root, log))
        return future

    def worker_lost(self, error: BaseException) -> bool:
        return False

    def restart(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        import torch

        torch.set_num_threads(self.threads)


def _start_worker(threads: int, devices) -> None:
    """A worker process's set-up, once: its GPU (before torch sees CUDA), its threads, and
    Ctrl-C left to the trainer (it stops a stage at a step, with a checkpoint) instead of
    killing the worker; one that arrives outside a training loop is kept for the next
    (``mtl.signals.remember``)."""
    from mtl import signals

    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    signal.signal(signal.SIGINT, signals.remember)
    import torch

    torch.set_num_threads(threads)


def _run_job(cfg: DictConfig, cell, stages: list[int], targets: list[str], root: str) -> int:
    from mtl.compare import train_cell

    # Flushed at once: a worker's stdout is the command's, and a killed worker's buffer would be lost.
    return train_cell(cfg, cell, stages, targets, Path(root), lambda message: print(message, flush=True))


class Processes:
    """``compare.workers`` worker processes (spawned, so no CUDA or thread state is inherited),
    alive across jobs. A killed worker breaks the pool: ``restart`` makes a new one."""

    def __init__(self, cfg: DictConfig, root: Path):
        import multiprocessing

        from mtl.compare import roles

        self.cfg, self.root, self.targets = cfg, root, roles(cfg)[0]
        self.slots = cfg.compare.workers
        self.threads = threads_per_cell(cfg)
        self.gpus = gpu_count(cfg)
        self.context = multiprocessing.get_context("spawn")
        self.pool = self._pool()

    def _pool(self) -> ProcessPoolExecutor:
        devices = None
        if self.gpus > 1:  # one GPU per worker: each takes one id from the queue as it starts
            devices = self.context.Queue()
            for d in range(self.slots):
                devices.put(d)
        return ProcessPoolExecutor(self.slots, mp_context=self.context, initializer=_start_worker, initargs=(self.threads, devices))

    def submit(self, job: Job, log) -> Future:
        return self.pool.submit(_run_job, self.cfg, job.cell, job.stages, self.targets, str(self.root))

    def worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, BrokenProcessPool)

    def restart(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._pool()

    def stop(self) -> None:
        """SIGINT to every worker: a running stage stops at its next step with a checkpoint.
        (A terminal's Ctrl-C reaches them too; the trainer stops once either way.)"""
        for process in list(self.pool._processes.values()):  # the pool's own workers; no public accessor
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)

    def kill(self) -> None:
        for process in list(self.pool._processes.values()):
            if process.is_alive():
                process.kill()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def ray_module(c: DictConfig):
    """Ray, and ``compare.ray_address`` (or RAY_ADDRESS) answering if given: clear errors
    before anything trains when Ray is not installed or the address does not answer."""
    try:
        import ray
    except ImportError:
        raise ConfigError("compare.executor: ray needs Ray, which is not installed; install the extra: pip install 'mtl[ray]' "
                          "(make install does), or leave compare.executor=local.") from None
    address = c.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address not in ("auto", "local"):
        # ray.init retries an address that does not answer for about a minute; a socket says so in seconds.
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise ConfigError(f"compare.ray_address: the Ray cluster at {address!r} does not answer ({e}); start it (ray start --head) "
                              "or fix the address (host:port of its head node, or ray://host:port for Ray Client).") from None
    return ray, address


def _ray_job(cfg: DictConfig, cell, stages: list[int], targets: list[str], root: str, cwd: str, threads: int) -> int:
    import torch

    os.chdir(cwd)  # the comparison's relative paths are the driver's
    torch.set_num_threads(threads)
    return _run_job(cfg, cell, stages, targets, root)


class Ray:
    """Each job a Ray task: ``threads`` CPUs (and one GPU on a GPU device) reserved for it. Ray
    reruns a task whose worker died, up to ``RETRIES`` times."""

    def __init__(self, cfg: DictConfig, root: Path):
        from mtl.compare import roles

        self.ray, address = ray_module(cfg.compare)
        self.started = not self.ray.is_initialized()  # a local instance of our own, shut down by close
        if self.started:
            local = {} if address else {"num_cpus": available_cores(), "include_dashboard": False}
            self.ray.init(address=address, log_to_driver=True, configure_logging=False, **local)
        self.cfg, self.root, self.targets = cfg, root, roles(cfg)[0]
        self.threads = cfg.compare.threads or 1
        gpus = 1 if gpu_count(cfg) else 0
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.slots = cfg.compare.workers or max(1, cpus // self.threads)
        self.task = self.ray.remote(_ray_job).options(num_cpus=self.threads, num_gpus=gpus, max_retries=RETRIES, retry_exceptions=False)
        self.refs: dict[Future, Any] = {}

    def submit(self, job: Job, log) -> Future:
        ref = self.task.remote(self.cfg, job.cell, job.stages, self.targets, str(self.root), os.getcwd(), self.threads)
        future = ref.future()
        self.refs[future] = ref
        return future

    def worker_lost(self, error: BaseException) -> bool:
        return False  # Ray has rerun it already

    def restart(self) -> None:
        pass

    def _running(self) -> list:
        return [ref for future, ref in self.refs.items() if not future.done()]

    def stop(self) -> None:
        for ref in self._running():
            self.ray.cancel(ref)  # KeyboardInterrupt in the task: the trainer writes a checkpoint and stops

    def kill(self) -> None:
        for ref in self._running():
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.refs.clear()
        if self.started:
            self.ray.shutdown()


def build_executor(cfg: DictConfig, root: Path):
    c = cfg.compare
    if c.executor == "ray":
        return Ray(cfg, root)
    return Processes(cfg, root) if (c.workers or 1) > 1 else Inline(cfg, root)


@contextlib.contextmanager
def _interrupts():
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the grid's loop, whatever the process
    inherited: a command started in the background of a non-interactive shell (``make test &``,
    a CI runner) inherits SIGINT ignored, and Python then installs no handler of its own, so the
    grid would run on. Off the main thread (no signal handlers there) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_jobs(todo: list[Job], executor, log=print, progress: bool = False) -> int:
    """Run the graph ``todo`` on ``executor``; the number of stages trained. A job whose worker
    died is run again (it resumes); any other error, or Ctrl-C, stops the running jobs and is raised."""
    from tqdm import tqdm

    pending = {j.key: j for j in todo}
    done: set[str] = set()
    running: dict[Future, tuple[Job, float]] = {}
    lost = dict.fromkeys(pending, 0)
    trained, total = 0, len(todo)
    bar = tqdm(total=total, desc="grid", unit="job", disable=not progress or not total, dynamic_ncols=True)
    shown = min(executor.slots, LINES) if executor.slots > 1 else 0
    lines = [tqdm(total=0, bar_format="{desc}", position=k + 1, disable=bar.disable) for k in range(shown)]

    def say(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    def show() -> None:
        now = time.perf_counter()
        for line, (job, start) in zip(lines, [*running.values(), *[(None, 0.0)] * len(lines)]):
            line.set_description_str(f"  {job.label}: {now - start:.0f}s" if job else "", refresh=True)
        bar.set_postfix(running=len(running), refresh=True)

    def settle(future: Future) -> bool:
        """Take a finished job's result; True when its worker died (the job is queued again)."""
        nonlocal trained
        job, start = running.pop(future)
        error = future.exception()
        if error is None:
            trained += future.result()
            done.add(job.key)
            bar.update()
            say(f"[{len(done)}/{total}] {job.label}: done in {time.perf_counter() - start:.1f}s")
            return False
        if not executor.worker_lost(error):
            raise error
        lost[job.key] += 1
        if lost[job.key] > RETRIES:
            raise RuntimeError(f"{job.label}: its worker died {lost[job.key]} times ({error}); the grid stopped. Finished cells are "
                               "kept: rerun the same command to resume.") from error
        say(f"{job.label}: its worker died ({type(error).__name__}); run again ({lost[job.key]}/{RETRIES}), resuming from its checkpoint")
        pending[job.key] = job
        return True

    with _interrupts():
        try:
            while pending or running:
                for job in [j for j in pending.values() if all(a in done for a in j.after)]:
                    if len(running) >= executor.slots:
                        break
                    del pending[job.key]
                    running[executor.submit(job, say)] = (job, time.perf_counter())
                show()
                finished, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                if any([settle(f) for f in finished]):
                    # A dead worker takes the pool's other jobs with it: collect them all, then a new pool.
                    for future in wait(list(running))[0]:
                        settle(future)
                    executor.restart()
        except BaseException:
            _stop(executor, running, say)
            raise
        finally:
            for line in lines:
                line.close()
            bar.close()
    return trained


def _stop(executor, running: dict, say) -> None:
    """Every running job stops at its next step with a checkpoint; workers that do not within
    ``STOP_WAIT_S`` are killed (their jobs resume from their previous checkpoint)."""
    if not running:
        return
    say(f"stopping {len(running)} running job(s) at their next step; rerun the same command to resume the grid.")
    executor.stop()
    try:
        _, late = wait(list(running), timeout=STOP_WAIT_S)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        late = running
    if late:
        executor.kill()
