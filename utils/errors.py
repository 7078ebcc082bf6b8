"""The one base class of every "your input is wrong" error, so entry points can report it as one clear message."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (config, dataset files, checkpoint folders, indexes).

    The message names the file or field, what is wrong and the fix. Entry points (`trainer.py`, `search.py`,
    `prepare_checkpoints.py`) print it without a traceback and exit with status 2; anything else is a bug and keeps
    its traceback.
    """


class ImageSizeError(InputError):
    """`img_size_str` is not two positive integers, or the size does not tile into the backbone's patches."""


def user_message(error: InputError) -> str:
    """The error's own message; a DataLoader worker re-raises it wrapped in the worker's traceback, which is cut."""
    message = str(error)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]  # "data.datasets.ImageReadError: <message>"
    name, separator, own = last.partition(": ")
    return own if separator and name.split(".")[-1] == type(error).__name__ else last
