"""User-facing errors: the CLI prints `qexport: error: <message>` and exits non-zero, no traceback
(`--debug` adds the traceback of what caused it)."""
from __future__ import annotations

import contextlib


class QexportError(Exception):
    """A mistake in the user's input or environment, stated in one line."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run: the message says what was kept and how to go on."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, for wrapping a library error into one line."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@contextlib.contextmanager
def stage(what: str):
    """Any error inside becomes one QexportError line, "<what> failed: <Type>: <first line>",
    chained to the original (a QexportError, or an interrupt, passes as it is): a user's model
    that trips a library never ends in a traceback."""
    try:
        yield
    except QexportError:
        raise
    except Exception as e:  # noqa: BLE001 - the point: any failure, stated in one line
        raise QexportError(f"{what} failed: {first_line(e)}") from e
