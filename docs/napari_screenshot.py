"""Makes docs/napari_widget.png: the "Sparse training" widget after training and densify on
synthetic tubules (run under Xvfb: `xvfb-run -a python docs/napari_screenshot.py`)."""

import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from sparseseg.napari.widget import SparseTrainingWidget
from sparseseg.synthetic import CLASS_NAMES, tubules
from sparseseg.trainer.sparse import orthogonal_slices, sparsify

OUT = Path(__file__).resolve().parent / "napari_widget.png"
ITERATIONS = int(sys.argv[1]) if len(sys.argv) > 1 else 60


def wait(widget):
    app = QApplication.instance()
    while widget._worker is not None:
        app.processEvents()
        time.sleep(0.05)


def main():
    image, dense = tubules((24, 64, 64), seed=1)
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1500, 900)
    viewer.add_image(image[0], name="tubules")
    widget = SparseTrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Sparse training", area="right")
    widget.image_combo.setCurrentText("tubules")
    layer = widget.new_sparse_labels()
    layer.data = sparsify(dense, orthogonal_slices(dense.shape, (2, 2, 2)), 255)
    layer.metadata["class_names"] = list(CLASS_NAMES)
    widget.model_path.setText(str(Path(tempfile.mkdtemp()) / "model.pt"))
    widget.iterations.setValue(ITERATIONS)
    widget.device.setCurrentText("cpu")
    widget.val_fraction.setValue(0.2)
    widget.extra_options = {"base_width": 8, "depth": 2}
    widget.start_training()
    wait(widget)
    widget.probabilities.setChecked(False)
    widget.start_densify()
    wait(widget)
    viewer.dims.set_point(0, 16)
    viewer.layers["tubules sparse labels"].visible = True
    for _ in range(20):
        QApplication.instance().processEvents()
    viewer.window.screenshot(str(OUT), flash=False, canvas_only=False)
    print(widget.status.text())
    print("wrote", OUT)
    viewer.close()


if __name__ == "__main__":
    main()
