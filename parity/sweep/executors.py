"""Where a sweep's cases run: a local process pool, or a Ray cluster.

Both run each case as two tasks, `record_step` then `check_step` (`parity.sweep.cases`), in
worker processes of their own kind, so torch and the port are never resident in one process,
and both retry a step whose worker died (`max_retries` times) before calling the case an error.
`finish(task, result)` is called in the parent as each case ends, in completion order.

How many workers, and whether a worker may run more than one task, follows from memory
(`plan_workers`): a reused worker keeps what its last task held (torch does not hand freed
memory back), so workers are reused only when a record and a check worker per slot fit.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from sdxl_common.errors import MissingExtraError

from .cases import CaseTask, check_step, record_step, starts
from .matrix import Resources, SweepError

Finish = Callable[[CaseTask, Dict], None]
GiB = 2 ** 30
BASE_PROCESS_BYTES = 1 * GiB  # interpreter, torch or MindSpore, tokenizers: measured 0.6-0.9 GiB
WEIGHT_FACTOR = 1.5  # sdxl-base at 1024x1024: 19.4 GiB resident for 12.9 GiB of weights
MEMORY_SHARE = 0.8  # of the memory available now, leaving room for everything else


@dataclass(frozen=True)
class WorkerPlan:
    """How many cases run at once, and whether workers outlive their task."""

    workers: int
    reuse: bool
    record_bytes: int  # estimated peak of one record worker
    check_bytes: int
    budget_bytes: int

    def describe(self) -> str:
        return (f"{self.workers} worker{'s' * (self.workers != 1)} "
                f"({'reused' if self.reuse else 'one process per task'}; estimated "
                f"{self.record_bytes / GiB:.1f} GiB per record, {self.check_bytes / GiB:.1f} "
                f"GiB per check, {self.budget_bytes / GiB:.1f} GiB to use)")


def checkpoint_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency; /proc as in sdxl-bench
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def plan_workers(weights_bytes: int, truth: bool, cases: int,
                 requested: Optional[int] = None) -> WorkerPlan:
    """Workers = min(cores, memory budget / a case's estimated peak) unless `requested`."""
    record = int(BASE_PROCESS_BYTES + WEIGHT_FACTOR * weights_bytes * (3 if truth else 1))
    check = int(BASE_PROCESS_BYTES + WEIGHT_FACTOR * weights_bytes)
    budget = int(available_bytes() * MEMORY_SHARE)
    if requested is None:
        workers = max(1, min(cpu_count(), budget // max(record, check), max(cases, 1)))
    else:
        workers = requested
    return WorkerPlan(workers=workers, reuse=workers * (record + check) <= budget,
                      record_bytes=record, check_bytes=check, budget_bytes=budget)


def crash_error(step: str, tries: int, why: str) -> Dict:
    return {"ok": False, "error": f"{step}: the worker process died {tries} time"
                                  f"{'s' * (tries != 1)} ({why})"}


@dataclass
class _Step:
    kind: str  # record or check
    task: CaseTask
    recorded: Optional[Dict] = None  # the record step's result, for the check step


class LocalExecutor:
    """Each worker is a spawn-context `ProcessPoolExecutor` of one process, kept for the next
    task of its kind when memory allows (`WorkerPlan.reuse`). A worker that dies breaks only
    its own pool, so the crash is its task's own: the task is retried in a new worker, up to
    `max_retries` times, and no other case is disturbed."""

    name = "local"

    def __init__(self, plan: WorkerPlan, max_retries: int = 2):
        self.plan = plan
        self.max_retries = max_retries
        self._context = multiprocessing.get_context("spawn")
        self._pools: List[ProcessPoolExecutor] = []
        self._idle: Dict[str, List[ProcessPoolExecutor]] = {"record": [], "check": []}

    def _worker(self, kind: str) -> ProcessPoolExecutor:
        if self._idle[kind]:
            return self._idle[kind].pop()
        pool = ProcessPoolExecutor(max_workers=1, mp_context=self._context)
        self._pools.append(pool)
        return pool

    def _release(self, kind: str, pool: ProcessPoolExecutor, broken: bool = False) -> None:
        if self.plan.reuse and not broken:
            self._idle[kind].append(pool)
        else:
            self._pools.remove(pool)
            pool.shutdown(wait=not broken)

    def _retire(self, kind: str) -> None:
        """No task of `kind` is left: its idle workers give their memory back."""
        for pool in self._idle[kind]:
            self._pools.remove(pool)
            pool.shutdown(wait=True)
        self._idle[kind] = []

    def run(self, tasks: Sequence[CaseTask], finish: Finish) -> None:
        waiting = collections.deque(_Step("record", t) for t in tasks)
        ready: collections.deque = collections.deque()  # checks and retries go first
        retries: collections.Counter = collections.Counter()
        running: Dict = {}  # future -> (step, its worker)
        try:
            while waiting or ready or running:
                while len(running) < self.plan.workers and (ready or waiting):
                    step = ready.popleft() if ready else waiting.popleft()
                    pool = self._worker(step.kind)
                    if step.kind == "record":
                        future = pool.submit(record_step, step.task)
                    else:
                        future = pool.submit(check_step, step.task, step.recorded)
                    running[future] = (step, pool)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    step, pool = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool as e:  # its worker died: killed, out of memory
                        self._release(step.kind, pool, broken=True)
                        key = (step.task.id, step.kind)
                        if retries[key] < self.max_retries:
                            retries[key] += 1
                            ready.appendleft(step)
                        else:
                            finish(step.task, crash_error(step.kind, retries[key] + 1, str(e)))
                        continue
                    except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be sent
                        result = {"ok": False, "error": f"{step.kind}: {type(e).__name__}: {e}"}
                    self._release(step.kind, pool)
                    if step.kind == "record" and result.get("ok"):
                        ready.append(_Step("check", step.task, result))
                    else:
                        finish(step.task, result)
                if not waiting and not any(s.kind == "record" for s in ready):
                    self._retire("record")
        except BaseException:
            self._terminate()
            raise
        finally:
            for pool in self._pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self._pools, self._idle = [], {"record": [], "check": []}

    def _terminate(self) -> None:
        """Stop every worker now (Ctrl-C): their cases have no case.json and rerun later.
        Without this, interpreter exit would wait for every running task to finish."""
        for pool in self._pools:
            stop = getattr(pool, "terminate_workers", None)  # Python >= 3.14
            if stop is not None:
                stop()
                continue
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)


class RayExecutor:
    """Record and check as Ray tasks, the check depending on the record's result; Ray
    reruns a task whose worker died (`max_retries`). With no address a local cluster is
    started with the planned number of CPUs and shut down at the end."""

    name = "ray"

    def __init__(self, plan: WorkerPlan, resources: Dict[str, Resources],
                 address: Optional[str] = None, max_retries: int = 2,
                 log: Callable[[str], None] = lambda s: None):
        self.plan = plan
        self.resources = resources
        self.address = address
        self.max_retries = max_retries
        self.log = log

    @staticmethod
    def require() -> None:
        """Ray importable (one line and exit 2 otherwise), checked before any work."""
        import importlib.util

        try:
            found = importlib.util.find_spec("ray") is not None
        except (ImportError, ValueError):  # ValueError: blocked via sys.modules["ray"] = None
            found = False
        if not found:
            raise MissingExtraError("--executor ray", "ray", "ray")

    def _connect(self):
        import ray

        if ray.is_initialized():  # a driver that connected already (e.g. a notebook)
            return ray, False
        env = {"PYTHONPATH": os.pathsep.join(
            [os.getcwd()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        if os.environ.get("SDXL_PARITY_CACHE"):
            env["SDXL_PARITY_CACHE"] = os.environ["SDXL_PARITY_CACHE"]
        options = dict(runtime_env={"env_vars": env}, logging_level=logging.ERROR,
                       log_to_driver=False)  # the workers' output goes to each case's logs
        if self.address:
            self.log(f"connecting to the Ray cluster at {self.address}")
            ray.init(address=self.address, **options)
        else:
            self.log(f"starting a local Ray cluster ({self.plan.workers} "
                     f"CPU{'s' * (self.plan.workers != 1)})")
            ray.init(num_cpus=self.plan.workers, include_dashboard=False,
                     object_store_memory=128 * 2 ** 20, **options)
        return ray, True

    def _check_resources(self, ray) -> None:
        """A task that asks for more than the cluster has would wait forever: say so."""
        have = ray.cluster_resources()
        for step, res in self.resources.items():
            asked = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
            short = [f"{k} {v:g} (the cluster has {have.get(k, 0):g})" for k, v in asked.items()
                     if v and v > have.get(k, 0)]
            if short:
                message = f"[resources.{step}] asks for {', '.join(short)}"
                if self.address:
                    self.log(f"warning: {message}; its tasks wait until the cluster grows")
                else:
                    raise SweepError(f"{message}: the local Ray cluster cannot run it; lower "
                                     "it or pass --address of a cluster that has it")

    def run(self, tasks: Sequence[CaseTask], finish: Finish) -> None:
        # Ray's driver prints cluster notices (a worker died, and it was retried) on stdout;
        # stdout is the sweep's verdict, so they go to stderr with the progress lines
        with contextlib.redirect_stdout(sys.stderr):
            self._run(tasks, finish)

    def _run(self, tasks: Sequence[CaseTask], finish: Finish) -> None:
        ray, started = self._connect()
        pending: Dict = {}
        records: List = []
        try:
            self._check_resources(ray)
            calls = {} if self.plan.reuse else {"max_calls": 1}

            def remote(fn, step):
                return ray.remote(fn).options(max_retries=self.max_retries, **calls,
                                              **self.resources[step].ray_options())

            record, check = remote(record_step, "record"), remote(check_step, "check")
            for task in tasks:
                records.append(record.remote(task))
                pending[check.remote(task, records[-1])] = task
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:  # retries spent: the worker kept dying
                        step = "check" if starts(task.folder, "check") else "record"
                        result = crash_error(step, starts(task.folder, step), _ray_reason(e))
                    finish(task, result)
        except BaseException:
            for ref in list(pending) + records:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()


def _ray_reason(e: BaseException) -> str:
    """The first line of a Ray error that says what happened."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def make_executor(name: str, plan: WorkerPlan, resources: Dict[str, Resources],
                  address: Optional[str], max_retries: int,
                  log: Callable[[str], None]):
    if name == "ray":
        RayExecutor.require()
        return RayExecutor(plan, resources, address, max_retries, log)
    if address:
        raise SweepError("--address names a Ray cluster: use it with --executor ray")
    return LocalExecutor(plan, max_retries)


