"""User-facing errors.

Everything a user can get wrong (paths, shapes, label values, checkpoints) raises
`SparsesegError` with a one-line message; the CLI turns it into `error: <message>` and a
non-zero exit instead of a traceback. Programming errors stay ordinary exceptions.
"""


class SparsesegError(Exception):
    """A problem with the user's input, reported as one line."""


class CheckpointError(SparsesegError):
    """A file that is not a valid sparseseg checkpoint."""


def one_line(e: BaseException) -> str:
    """An exception as one line: a SparsesegError's own message, else its type and first line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, SparsesegError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
