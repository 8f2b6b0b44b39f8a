"""Run a training generator in a child process and stream its events back (napari's training jobs).

Why a process and not the napari worker thread it used to run in: PyTorch's CPU tensors come from
glibc's ``malloc``, and only the main thread's arena can keep freed activations for the next step
(:func:`~napari_e2enet.allocator.keep_freed_memory`); a worker thread's arena maps and unmaps
every large tensor, so each step faults its activations in again. Measured on the development VM
(AMD EPYC Zen 3, 2 threads; paper network S = 0.8, 64³, batch 2): 13.4 s per step on a thread
against 8.3 s on a main thread. A child process also keeps training's Python work off the GIL that
napari's event loop needs.

:func:`iter_in_subprocess` is a generator like the ones it wraps: it yields the child's events,
re-raises the child's exception, and stops when asked (the child sees the same stop request at its
next cancel point, saves what it saves on a stop, and ends). Closing it early (napari's own cancel)
asks the child to stop and waits for it to finish cleanly.
"""

from __future__ import annotations

import builtins
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..allocator import keep_freed_memory
from ..errors import InputError

__all__ = ["fit_events", "finetune_events", "iter_in_subprocess"]

# How long a closed or cancelled job waits for the child to save its state and end before it is
# terminated (a stop is honoured within one iteration; a large run's state save takes seconds).
_STOP_GRACE_S = 120.0
_POLL_S = 0.1


def fit_events(stop: threading.Event, config: Any, run_dir: str | Path, dataset: Any = None, *,
               resume: bool = False) -> Iterator[Any]:
    """``Trainer(config, run_dir, dataset=..., resume=..., stop=stop).iter_fit()`` (picklable by name;
    closing this generator closes the Trainer's, which saves what a stop saves)."""
    from .loop import Trainer

    yield from Trainer(config, run_dir, dataset=dataset, resume=resume, stop=stop).iter_fit()


def finetune_events(stop: threading.Event, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """:func:`~napari_e2enet.training.finetune.iter_finetune` with ``stop`` first (picklable by name)."""
    from .finetune import iter_finetune

    yield from iter_finetune(*args, stop=stop, **kwargs)


def iter_in_subprocess(gen_func: Callable[..., Iterator[Any]], *args: Any, stop: threading.Event,
                       **kwargs: Any) -> Iterator[Any]:
    """Yield the events of ``gen_func(child_stop, *args, **kwargs)`` run in a fresh (spawned) process.

    ``gen_func`` must be importable by name (a module-level function) and its arguments and events
    picklable. Setting ``stop`` here sets the child's stop event; the child's exception is raised
    here with its type and message; a child that dies without a word (killed, out of memory) is a
    ``RuntimeError`` naming its exit code.
    """
    context = mp.get_context("spawn")  # fork would copy napari's Qt state and threads
    events: Any = context.Queue()
    child_stop = context.Event()
    process = context.Process(target=_child, args=(gen_func, args, kwargs, events, child_stop),
                              name=f"napari-e2enet {getattr(gen_func, '__name__', 'job')}", daemon=True)
    process.start()
    finished = False
    try:
        while True:
            if stop.is_set():
                child_stop.set()
            try:
                kind, payload = events.get(timeout=_POLL_S)
            except queue.Empty:
                if process.is_alive():
                    continue
                kind, payload = _last_message(process, events)
            if kind == "event":
                yield payload
            elif kind == "error":
                finished = True
                raise _rebuild(*payload)
            else:
                finished = True
                return
    finally:
        _end(process, events, child_stop, graceful=finished)
        events.close()


class _StopRequest:
    """The child's stop: the parent's shared event, or a Ctrl-C that reached this process.

    A Ctrl-C in the terminal napari runs from reaches the whole process group, this child too. It
    must stop the job the way Stop does (save, then end), not kill it mid-step with a
    KeyboardInterrupt. The signal handler only sets a plain flag: setting the shared event there
    deadlocks when the signal lands while the main thread holds that event's lock (in ``is_set``).
    """

    def __init__(self, shared: Any) -> None:
        self.shared = shared
        self.interrupted = False

    def on_signal(self, signum: int, frame: Any) -> None:
        self.interrupted = True

    def is_set(self) -> bool:
        return self.interrupted or self.shared.is_set()

    def set(self) -> None:
        self.interrupted = True

    def wait(self, timeout: float | None = None) -> bool:
        """Like Event.wait; a Ctrl-C is seen within ``_POLL_S``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if left <= 0:
                return False
            self.shared.wait(left)
        return True


def _child(gen_func: Callable[..., Iterator[Any]], args: tuple[Any, ...], kwargs: dict[str, Any],
           events: Any, shared_stop: Any) -> None:
    """The child's main thread: run the generator inside keep_freed_memory, post every event."""
    stop = _StopRequest(shared_stop)
    signal.signal(signal.SIGINT, stop.on_signal)
    try:
        with keep_freed_memory():
            for event in gen_func(stop, *args, **kwargs):
                events.put(("event", event))
    except BaseException as exc:  # every failure goes back to the parent
        events.put(("error", _describe(exc)))
    else:
        events.put(("end", None))
    finally:
        events.close()
        events.join_thread()  # the parent reads everything before it sees the process gone


def _describe(exc: BaseException) -> tuple[str, str, str | None]:
    """What the parent needs to raise the same error: its type's name, its message, its file. Sent as
    text: the parent never unpickles an exception object."""
    if isinstance(exc, InputError):
        return "InputError", exc.message, None if exc.path is None else str(exc.path)
    return type(exc).__name__, str(exc), None


def _rebuild(name: str, message: str, path: str | None) -> BaseException:
    """InputError and the built-in exceptions as themselves, anything else as a RuntimeError naming it."""
    if name == "InputError":
        return InputError(message, path)
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        try:
            return builtin(message)
        except TypeError:  # a built-in that takes other arguments (UnicodeDecodeError)
            pass
    return RuntimeError(f"{name}: {message}")


def _last_message(process: Any, events: Any) -> tuple[str, Any]:
    """The child is gone: its last message may still be in the pipe; without one, say how it ended."""
    process.join(timeout=1.0)
    try:
        return events.get(timeout=1.0)
    except queue.Empty:
        raise RuntimeError(f"the training process ended unexpectedly (exit code {process.exitcode})") from None


def _end(process: Any, events: Any, child_stop: Any, *, graceful: bool) -> None:
    """Ask a still-running child to stop, give it time to save (reading what it still posts, so its
    queue never blocks it), then make sure it is gone."""
    if not graceful:
        child_stop.set()
    deadline = time.monotonic() + (_STOP_GRACE_S if not graceful else 10.0)
    while process.is_alive() and time.monotonic() < deadline:
        try:
            events.get(timeout=_POLL_S)
        except queue.Empty:
            pass
    process.join(timeout=1.0)
    if process.is_alive():
        process.terminate()
        process.join(timeout=5.0)
