"""The project's documented error type for bad user input.

Every bad input (file, dataset, checkpoint, option) ends in an ``InputError`` whose message is one
line naming the file (or option) and the problem. The CLI turns it into exit code 2; napari turns it
into a notification. Anything else escaping is a bug.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A bad input: ``str(err)`` is one line, ``"<path>: <problem>"`` when a file is involved."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        text = " ".join(str(message).split())  # one line, always
        self.message = text  # without the path (a training process sends both to napari)
        super().__init__(f"{path}: {text}" if path is not None else text)
