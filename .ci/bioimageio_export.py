"""CI: a bioimage.io export of a tiny trained model, run in the environment README's install makes.

Exits non-zero with the exporter's one-line error if the package cannot be built, validated or test-run.
"""
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import run_cli  # noqa: E402
from tests.test_export import trained_checkpoint  # noqa: E402

print("bioimageio export check with " + ", ".join(
    f"{p} {version(p)}" for p in ("pydantic", "bioimageio.spec", "bioimageio.core")))
with tempfile.TemporaryDirectory() as d:
    model = trained_checkpoint(Path(d) / "model.pt")
    code, out = run_cli("export", model, "--bioimageio", Path(d) / "model.zip")
    print(out.strip())
    if code != 0 or "test-run with bioimageio.core" not in out or not (Path(d) / "model.zip").is_file():
        sys.exit(1)
