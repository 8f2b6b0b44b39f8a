"""Core generators → napari workers, with a stop Event, napari progress and clean cancellation.

``start_job(gen_func, ...)`` runs a core generator (``Predictor.iter_predict``,
``Trainer.iter_fit`` or a small wrapper around them) in a ``napari.qt.threading`` worker thread.
Every yielded event reaches ``on_event`` in the GUI thread; the GUI never blocks.

Cancelling sets the job's ``threading.Event``: the core checks it between tiles / iterations, so it
stops within one tile (inference) or one iteration (training), runs its own clean-up (the Trainer
saves a resumable state) and the generator ends normally; the worker then finishes by itself.
``worker.quit()`` (napari's status-bar cancel) is honoured too: the abandoned generator is closed
once the thread is done, so its ``finally`` clean-up still runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QLabel, QProgressBar, QVBoxLayout, QWidget

from ..errors import InputError


class Job(QObject):
    """A running core generator: ``cancel()``, ``running``, ``cancelled``; see module docstring.

    ``done`` is emitted (in the GUI thread) after the ``on_done`` callback, once the worker is over.
    """

    done = Signal()

    def __init__(self, gen_func: Callable[[threading.Event], Iterator[Any]], *,
                 on_event: Callable[[Any], None] | None = None,
                 on_done: Callable[[Job], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 description: str = "", total: int | None = None) -> None:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        super().__init__()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False
        self._running = True
        self._on_event = on_event
        self._on_done = on_done
        self._on_error = on_error
        self.progress = progress(total=total or 0, desc=description)
        self.worker = create_worker(gen_func, self.stop, _start_thread=False, _ignore_errors=True)
        self.worker.yielded.connect(self._yielded)
        self.worker.errored.connect(self._errored)
        self.worker.aborted.connect(self._aborted)
        self.worker.finished.connect(self._finished)
        self.worker.start()

    @property
    def running(self) -> bool:
        return self._running

    def cancel(self) -> None:
        """Ask the core to stop at its next cancel point (within one tile / iteration)."""
        self.cancelled = True
        self.stop.set()

    def set_progress(self, done: int, total: int, description: str | None = None) -> None:
        if self.progress.total != total:
            self.progress.total = total
        delta = int(done) - int(self.progress.n)
        if delta:
            self.progress.update(delta)
        if description is not None:
            self.progress.set_description(description)

    # -- worker signals (GUI thread) ------------------------------------------------------------
    def _yielded(self, value: Any) -> None:
        if self._on_event is not None and not self.stop.is_set():
            _call_gui(self._on_event, value)
        elif self._on_event is not None and getattr(value, "kind", None) in ("stopped", "done", "checkpoint"):
            _call_gui(self._on_event, value)  # the trainer's final events still matter after a stop request

    def _errored(self, exc: BaseException) -> None:
        self.error = exc
        if self._on_error is not None:
            _call_gui(self._on_error, exc)

    def _aborted(self) -> None:
        self.cancelled = True
        self.stop.set()

    def _finished(self) -> None:
        gen = getattr(self.worker, "_gen", None)
        if gen is not None:
            try:
                gen.close()  # after worker.quit(): run the generator's own clean-up
            except Exception:
                pass
        self.progress.close()
        self._running = False
        try:
            if self._on_done is not None:
                _call_gui(self._on_done, self)
        finally:
            self.done.emit()


class JobSlot:
    """A widget's current :class:`Job`; cancels it when the widget is destroyed (viewer closed),
    so a training run never outlives its window."""

    def __init__(self, widget: QObject) -> None:
        self.job: Job | None = None
        widget.destroyed.connect(self._cancel)

    def _cancel(self, *_: Any) -> None:
        if self.job is not None and self.job.running:
            self.job.cancel()


class JobWidget(QWidget):
    """A dock widget that runs one :class:`Job` at a time (the job/busy/cancel part the Segment and
    Train widgets share): ``job``, ``busy``, ``refuse_if_busy``, the progress bar and status line,
    ``cancel`` (the Cancel/Stop button, also run when the widget closes). Subclasses say what a
    cancel looks like in ``_cancelling`` and which buttons a running job disables."""

    progress_bar: QProgressBar
    status_label: QLabel

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._slot = JobSlot(self)

    @property
    def job(self) -> Job | None:
        """The running (or last) job."""
        return self._slot.job

    @job.setter
    def job(self, value: Job | None) -> None:
        self._slot.job = value

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def refuse_if_busy(self, message: str) -> bool:
        """True (having warned with ``message``) while a job runs: one job at a time."""
        if self.busy:
            from napari.utils.notifications import show_warning

            show_warning(message)
            return True
        return False

    def _build_progress(self, layout: QVBoxLayout) -> None:
        """The progress bar and the status line under the buttons."""
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m")
        layout.addWidget(self.progress_bar)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

    def cancel(self) -> None:
        """Ask the running job to stop (it ends at its next check, cleaning up after itself)."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self._cancelling()

    def _cancelling(self) -> None:
        """What the widget shows once a cancel was asked for."""
        self.status_label.setText("Cancelling…")

    def closeEvent(self, event: Any) -> None:
        self.cancel()
        super().closeEvent(event)


def _call_gui(callback: Callable[..., None], *args: Any) -> None:
    """Run a widget callback; a widget already deleted by Qt (viewer closed) is not an error."""
    try:
        callback(*args)
    except RuntimeError as exc:
        if "deleted" not in str(exc):
            raise


def error_message(exc: BaseException) -> str:
    """One line for a notification: InputError as is, anything else with its type."""
    if isinstance(exc, InputError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
