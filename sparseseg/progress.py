"""The one progress rule of long runs (training, inference).

A tqdm bar on stderr, shown when asked, or by default when stderr is a terminal; a hidden bar
leaves progress to log lines."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total, progress: bool | None = None, **options) -> tqdm:
    """A bar over `total` (None: not known yet); `progress` None: shown on a terminal only, so
    that logs and batch jobs get log lines instead of carriage returns."""
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, disable=not show, **options)
