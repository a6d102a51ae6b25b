"""User-facing errors.

Everything a user can get wrong (paths, shapes, label values, checkpoints) raises
`SparsesegError` with a one-line message; the CLI turns it into `error: <message>` and a
non-zero exit instead of a traceback. Programming errors stay ordinary exceptions.
"""


class SparsesegError(Exception):
    """A problem with the user's input, reported as one line."""


class CheckpointError(SparsesegError):
    """A file that is not a valid sparseseg checkpoint."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): library messages can run
    to pages (a validator's report, a traceback inside an ONNX error)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def one_line(e: BaseException) -> str:
    """An exception as one line for a user: a SparsesegError's own message, any other error's
    type before its first line (the type alone when it has no message)."""
    text = first_line(e)
    if isinstance(e, SparsesegError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
