"""napari's training jobs run in a child process (training.isolated): its events arrive in order,
Stop reaches it, its errors arrive as themselves, a crash is one clear error, and closing the job
early lets the child finish its clean-up."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from napari_e2enet.errors import InputError
from napari_e2enet.training.isolated import iter_in_subprocess


def where_am_i(stop, count: int, path: str):
    """The child's view: pid, main thread or not, whether freed memory is kept; then a bad input."""
    from napari_e2enet import allocator

    for i in range(count):
        yield {"i": i, "pid": os.getpid(), "main": threading.current_thread() is threading.main_thread(),
               "kept": allocator._depth[0] > 0}
    raise InputError("the labels are not on the image's grid", path)


def count_until_stopped(stop, marker: str):
    i = 0
    try:
        while not stop.is_set():
            yield ("iteration", i)
            i += 1
            stop.wait(0.05)
        yield ("stopped", i)
    finally:
        Path(marker).write_text(str(i))  # the clean-up a stop or a close must still run


def pid_then_count_until_stopped(stop, marker: str):
    yield ("pid", os.getpid())
    yield from count_until_stopped(stop, marker)


def fails(stop, how: str):
    yield "started"
    if how == "unpicklable":
        raise _LocalError(threading.Lock())
    import time

    time.sleep(0.5)  # "started" reaches the parent; then the process dies without a word
    os._exit(3)


class _LocalError(Exception):
    def __init__(self, lock):
        super().__init__("holds a lock")
        self.lock = lock  # a lock cannot be pickled


def test_events_arrive_in_order_from_a_child_main_thread_that_keeps_freed_memory_then_its_error(tmp_path):
    path = tmp_path / "labels.nii.gz"
    events = []
    with pytest.raises(InputError) as err:
        for event in iter_in_subprocess(where_am_i, 4, str(path), stop=threading.Event()):
            events.append(event)
    assert str(err.value) == f"{path}: the labels are not on the image's grid" and err.value.path == path
    assert [e["i"] for e in events] == [0, 1, 2, 3]
    assert {e["pid"] for e in events} != {os.getpid()} and len({e["pid"] for e in events}) == 1
    assert all(e["main"] and e["kept"] for e in events)


def test_stop_reaches_the_child_and_it_ends_cleanly(tmp_path):
    stop = threading.Event()
    marker = tmp_path / "cleaned"
    seen = []
    for kind, i in iter_in_subprocess(count_until_stopped, str(marker), stop=stop):
        seen.append(kind)
        if i == 2:
            stop.set()
    assert seen[-1] == "stopped" and seen.count("iteration") < 10
    assert marker.is_file()


def test_closing_the_job_early_still_runs_the_child_clean_up(tmp_path):
    marker = tmp_path / "cleaned"
    events = iter_in_subprocess(count_until_stopped, str(marker), stop=threading.Event())
    assert next(events) == ("iteration", 0)
    events.close()  # napari's own cancel abandons the generator
    assert marker.is_file()


def test_an_error_of_our_own_type_is_named_and_a_crash_names_its_exit_code():
    with pytest.raises(RuntimeError, match="_LocalError: holds a lock"):
        list(iter_in_subprocess(fails, "unpicklable", stop=threading.Event()))
    seen = []
    with pytest.raises(RuntimeError, match=r"ended unexpectedly \(exit code 3\)"):
        for event in iter_in_subprocess(fails, "exit", stop=threading.Event()):
            seen.append(event)
    assert seen == ["started"]


def test_a_ctrl_c_that_reaches_the_child_stops_the_job_like_stop_does(tmp_path):
    """Ctrl-C in napari's terminal reaches the child too: it must save and end, not die mid-step."""
    marker = tmp_path / "cleaned"
    seen = []
    for kind, value in iter_in_subprocess(pid_then_count_until_stopped, str(marker), stop=threading.Event()):
        seen.append(kind)
        if kind == "pid":
            child = value
        elif value == 2:
            os.kill(child, signal.SIGINT)
    assert seen[-1] == "stopped" and seen.count("iteration") < 10
    assert marker.is_file()
