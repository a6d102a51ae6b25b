import io
import sys

from sparseseg.errors import CheckpointError, SparsesegError, first_line, one_line
from sparseseg.progress import progress_bar


def test_one_line_keeps_a_user_error_and_names_any_other():
    assert one_line(CheckpointError("m.pt is not a sparseseg checkpoint")) == "m.pt is not a sparseseg checkpoint"
    assert one_line(ValueError("\n  bad value\ntraceback line 2\n")) == "ValueError: bad value"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(SparsesegError("")) == ""
    assert first_line(RuntimeError("first\nsecond")) == "first" and first_line(OSError()) == ""


def test_progress_bar_shows_on_a_terminal_only_unless_told(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())               # not a terminal
    assert progress_bar(10).disable and not progress_bar(10, True).disable

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(None, initial=3, unit="it")
    assert not bar.disable and bar.n == 3 and bar.total is None
    assert progress_bar(10, False).disable
