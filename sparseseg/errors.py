"""User-facing errors.

Everything a user can get wrong (paths, shapes, label values, checkpoints) raises
`SparsesegError` with a one-line message; the CLI turns it into `error: <message>` and a
non-zero exit instead of a traceback. Programming errors stay ordinary exceptions.
"""


class SparsesegError(Exception):
    """A problem with the user's input, reported as one line."""


class CheckpointError(SparsesegError):
    """A file that is not a valid sparseseg checkpoint."""
