"""Where cells run: a local process pool (default) or Ray tasks on a cluster; both yield the same records.

An executor takes cells and yields each finished run's record as soon as it is done (in completion order);
the parent process alone writes ``results.jsonl``, so workers never contend for the file. Each worker uses
one torch thread: parallelism comes from running cells side by side, and one thread per run keeps the
timing of a run independent of how many others share the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

import torch

from metalr.config import ConfigError
from metalr.evaluation.harness import Cell, cached_controller, run_cell
from metalr.evaluation.records import RunRecord


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Executor(Protocol):
    """Runs cells and yields their records in completion order."""

    def run(self, cells: Sequence[Cell]) -> Iterator[RunRecord]: ...

    def close(self) -> None: ...


class CellError(RuntimeError):
    """A run raised; the message names the cell so it can be reproduced alone."""


def _describe(cell: Cell) -> str:
    return f"{cell.entry.display} on {cell.spec.label} (seed {cell.seed}, lr {cell.lr:g}, {cell.steps} steps)"


# ----------------------------------------------------------------------------------------------------------
# Local processes

_WORKER_CONTROLLER: str | None = None


def _init_worker(controller_path: str | None) -> None:
    global _WORKER_CONTROLLER
    torch.set_num_threads(1)
    _WORKER_CONTROLLER = controller_path
    _exit_with_parent()


def _exit_with_parent(poll_seconds: float = 1.0) -> None:
    """Pool workers block on the call queue forever if the parent is SIGKILLed; leave when it is gone.

    A reparented worker sees its parent pid change (portable, unlike Linux's PR_SET_PDEATHSIG).
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_in_worker(cell: Cell) -> RunRecord:
    return run_cell(cell, cached_controller(_WORKER_CONTROLLER))


class InlineExecutor:
    """Runs cells one after another in this process (``workers=1``: no start-up cost, easy to debug)."""

    def __init__(self, controller_path: str | None) -> None:
        self.controller_path = controller_path

    def run(self, cells: Sequence[Cell]) -> Iterator[RunRecord]:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same single-threaded numerics as a pool worker
        try:
            controller = cached_controller(self.controller_path)
            for cell in cells:
                try:
                    yield run_cell(cell, controller)
                except Exception as err:
                    raise CellError(f"run failed: {_describe(cell)}: {err}") from err
        finally:
            torch.set_num_threads(threads)

    def close(self) -> None:
        return None


class ProcessExecutor:
    """A pool of ``workers`` spawned processes, each with one torch thread and its controller loaded once.

    ``spawn`` rather than ``fork``: forking a process whose OpenMP pool is already running can deadlock.
    """

    def __init__(self, workers: int, controller_path: str | None) -> None:
        self.workers = workers
        self.controller_path = controller_path
        self._pool: ProcessPoolExecutor | None = None

    def run(self, cells: Sequence[Cell]) -> Iterator[RunRecord]:
        if not cells:
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.controller_path,),
            )
        futures: dict[Future[RunRecord], Cell] = {self._pool.submit(_run_in_worker, c): c for c in cells}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    error = future.exception()
                    if error is not None:
                        raise CellError(f"run failed: {_describe(futures[future])}: {error}") from error
                    yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------------------------------------
# Ray

_RAY_CONTROLLERS: dict[str, Any] = {}


def _controller_from_bytes(blob: bytes | None) -> Any:
    """Load a checkpoint shipped as bytes (a cluster's workers need not share the driver's filesystem)."""
    if blob is None:
        return None
    digest = hashlib.sha256(blob).hexdigest()
    if digest not in _RAY_CONTROLLERS:
        directory = Path(tempfile.gettempdir()) / "metalr-controllers"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{digest[:16]}.safetensors"
        if not path.is_file():
            tmp = path.with_suffix(f".{id(blob)}.tmp")
            tmp.write_bytes(blob)
            tmp.replace(path)
        _RAY_CONTROLLERS[digest] = cached_controller(str(path))
    return _RAY_CONTROLLERS[digest]


def _ray_run_cell(cell: Cell, blob: bytes | None) -> RunRecord:
    torch.set_num_threads(1)
    return run_cell(cell, _controller_from_bytes(blob))


class RayExecutor:
    """Cells as Ray tasks (one CPU each) on the cluster at ``address``, or on a local Ray instance.

    The controller checkpoint travels through Ray's object store, so remote workers only need ``metalr``
    installed, not the driver's files.
    """

    def __init__(self, workers: int, controller_path: str | None, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install 'metalr[ray]'") from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            if address is None:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        self._blob = ray.put(Path(controller_path).read_bytes() if controller_path else None)
        self._remote = ray.remote(num_cpus=1)(_ray_run_cell)

    def run(self, cells: Sequence[Cell]) -> Iterator[RunRecord]:
        ray = self._ray
        refs = {self._remote.remote(cell, self._blob): cell for cell in cells}
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        raise CellError(f"run failed: {_describe(refs[ref])}: {err.cause}") from err
        finally:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()


def _process(workers: int, controller_path: str | None, address: str | None) -> Executor:
    if address is not None:
        raise ConfigError("--address is for --backend ray; the process backend runs on this machine")
    return InlineExecutor(controller_path) if workers == 1 else ProcessExecutor(workers, controller_path)


def _ray(workers: int, controller_path: str | None, address: str | None) -> Executor:
    return RayExecutor(workers, controller_path, address)


EXECUTORS: dict[str, Callable[[int, str | None, str | None], Executor]] = {"process": _process, "ray": _ray}


def create_executor(
    backend: str, workers: int, controller_path: str | None, address: str | None = None
) -> Executor:
    """The executor for ``backend`` (``process`` or ``ray``); an unknown name lists the valid ones."""
    if backend not in EXECUTORS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(sorted(EXECUTORS))}")
    if workers <= 0:
        raise ConfigError(f"workers must be a positive integer, got {workers}")
    return EXECUTORS[backend](workers, controller_path, address)
