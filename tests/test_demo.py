import json

from sparseseg.demo import run_demo
from sparseseg.volume import open_volume


def test_demo_smoke(tmp_path):
    """The demo's whole path with 2 iterations (the full run is timed in README/benchmarks)."""
    summary = run_demo(tmp_path / "demo", iterations=2)
    for name in summary["files"]:
        assert (tmp_path / "demo" / name).exists(), name
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["iterations"] == 2 and len(saved["iou"]) == 3
    assert open_volume(tmp_path / "demo" / "prediction.zarr").shape == (48, 96, 96)
    assert open_volume(tmp_path / "demo" / "image.zarr").channels == 3


def test_synthetic_tubules_have_three_classes():
    from sparseseg.synthetic import tubules

    image, labels = tubules((32, 64, 64), seed=3)
    frac = [(labels == c).mean() for c in range(3)]
    assert image.shape == (3, 32, 64, 64) and all(f > 0.01 for f in frac)
