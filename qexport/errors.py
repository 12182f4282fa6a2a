"""User-facing errors: the CLI prints `qexport: error: <message>` and exits non-zero, no traceback."""


class QexportError(Exception):
    """A mistake in the user's input or environment, stated in one line."""
