"""The "Sparse training" dock widget: paint a few slices, train, densify, correct, retrain.

Long work runs in napari's background workers (napari.qt.threading), so the viewer stays live:
training reports every iteration through the trainer's `on_step` hook into a list that a timer
on the GUI thread turns into the progress bar and the loss/validation curve; cancel makes the
hook return True, so training stops cleanly and still saves its checkpoint. Densify runs the
engine (block-wise, any volume size) into an OME-Zarr beside the model; the result layer reads
that store directly and is refreshed as blocks land. Every error becomes a napari notification.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from sparseseg.errors import SparsesegError, first_line, one_line
from sparseseg.model.defaults import DEFAULTS
from sparseseg.napari.reader import IGNORE_LABEL, labels_colormap

log = logging.getLogger("sparseseg.napari")

POLL_MS = 250
PREVIEW_S = 30.0       # seconds between live predictions of the slice in view while training


def notify_error(exc: BaseException) -> None:
    """One line in napari's notifications; the traceback of an unexpected error goes to the log."""
    from napari.utils.notifications import show_error

    if not isinstance(exc, SparsesegError):
        log.error("sparseseg widget: unexpected error", exc_info=exc)
    show_error(f"sparseseg: {one_line(exc)}")


def default_options(**kw) -> dict:
    """Training options as the CLI would parse them (sparseseg.model.defaults.DEFAULTS, the same
    time budget included), with validation more often and no periodic checkpoints."""
    o = {**DEFAULTS, "ignore_label": IGNORE_LABEL, "val_every": 20, "checkpoint_every": 0}
    o.update(kw)
    return o


def plan_text(entry: dict, start: int = 0) -> str:
    """"~250 iterations at 2.3 s in 10 min, ETA 14:05" from a history entry of a budgeted run."""
    done, planned = entry["iteration"], entry.get("planned") or entry["iteration"]
    rate = entry["seconds"] / max(1, done - start)
    eta = time.strftime("%H:%M", time.localtime(time.time() + rate * max(0, planned - done)))
    return f"iteration {done} of ~{planned} at {rate:.2f} s, ETA {eta}"


class SparseTrainingWidget(QWidget):
    """Dock widget: pick image, paint sparse labels, train, densify, retrain."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_model: Path | None = None
        self.dense_layer = None
        self.extra_options: dict = {}      # programmatic overrides of the training options (tests, scripts)
        self._history: list = []
        self.preview_seconds = PREVIEW_S
        self.preview_layer = None
        self._view = None           # (axis, index) of the slice in view, read by the training thread
        self._preview = None        # (axis, index, labels) from the training thread, shown by the timer
        self._stop = False
        self._worker = None
        self._densify_out: Path | None = None
        self._densify_count = 0
        self._workdir = Path(tempfile.mkdtemp(prefix="sparseseg-napari-"))

        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.new_labels_btn = QPushButton("New sparse labels")
        self.template_btn = QPushButton("Open suggestion template")
        self.template_btn.setToolTip("a labels template written by `sparseseg-suggest IMAGE --template OUT`: "
                                     "painting writes into it; the suggested slices are listed below")
        self.suggestions = QComboBox()
        self.suggestions.setToolTip("go to a suggested slice (from the template)")
        self.preset = QComboBox()
        self.preset.addItems(["small", "paper"])
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.1, 24 * 60)
        self.budget.setDecimals(1)
        self.budget.setSuffix(" min")
        self.budget.setValue(DEFAULTS["time_budget"])
        self.budget.setToolTip("the iterations are planned from the measured step time to fit this budget")
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.1)
        self.model_path = QLineEdit(str(self._workdir / "model.pt"))
        self.browse_btn = QPushButton("…")
        self.train_btn = QPushButton("Train")
        self.retrain_btn = QPushButton("Retrain from here")
        self.cancel_btn = QPushButton("Cancel")
        self.densify_btn = QPushButton("Densify")
        self.probabilities = QCheckBox("probabilities layer")
        self.beside_image = QCheckBox("as a label image of the OME-Zarr image")
        self.beside_image.setToolTip("write the result into IMAGE.zarr/labels/<name> (NGFF image-label), so "
                                     "napari, Fiji/MoBIE, webKnossos and Neuroglancer open it over the image")
        self.progress = QProgressBar()
        self.status = QLabel("paint a few slices, then train")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("sparse labels", self.labels_combo)
        form.addRow("", self.new_labels_btn)
        form.addRow("", self.template_btn)
        form.addRow("suggested slice", self.suggestions)
        form.addRow("preset", self.preset)
        form.addRow("time budget", self.budget)
        form.addRow("device", self.device)
        form.addRow("validation fraction", self.val_fraction)
        row = QHBoxLayout()
        row.addWidget(self.model_path)
        row.addWidget(self.browse_btn)
        form.addRow("model", row)
        buttons = QHBoxLayout()
        for b in (self.train_btn, self.retrain_btn, self.cancel_btn):
            buttons.addWidget(b)
        dens = QHBoxLayout()
        dens.addWidget(self.densify_btn)
        dens.addWidget(self.probabilities)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self._make_curve())
        layout.addLayout(dens)
        layout.addWidget(self.beside_image)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.new_labels_btn.clicked.connect(self._guard(self.new_sparse_labels))
        self.template_btn.clicked.connect(self._guard(lambda: self.open_template()))
        self.suggestions.currentIndexChanged.connect(self._guard(lambda *_: self.go_to_suggestion()))
        self.browse_btn.clicked.connect(self._browse)
        self.train_btn.clicked.connect(self._guard(lambda: self.start_training(retrain=False)))
        self.retrain_btn.clicked.connect(self._guard(lambda: self.start_training(retrain=True)))
        self.cancel_btn.clicked.connect(self.cancel)
        self.densify_btn.clicked.connect(self._guard(self.start_densify))
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_layers)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        self._refresh_layers()
        self._set_busy(False)

    # ------------------------------------------------------------------ helpers

    def _guard(self, fn):
        """Run a button's action; errors become notifications, never a crashed viewer."""
        def call(*_):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the viewer must survive anything a button does
                notify_error(e)
                self._set_busy(False)
        return call

    def _make_curve(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2, 1.8), tight_layout=True)
        self._ax = fig.add_subplot(111)
        self._ax_val = self._ax.twinx()
        self._canvas = FigureCanvasQTAgg(fig)
        self._canvas.setMinimumHeight(140)
        self._draw_curve()
        return self._canvas

    def _draw_curve(self):
        ax, av = self._ax, self._ax_val
        ax.clear()
        av.clear()
        h = self._history
        if h:
            ax.plot([e["iteration"] for e in h], [e["loss"] for e in h], lw=1, color="tab:blue", label="loss")
            val = [e for e in h if e.get("val_mean_foreground_iou") is not None]
            if val:
                av.plot([e["iteration"] for e in val], [e["val_mean_foreground_iou"] for e in val], "o-", ms=3,
                        color="tab:orange", label="val IoU")
                av.set_ylim(0, 1)
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("loss", fontsize=7, color="tab:blue")
        av.set_ylabel("val IoU", fontsize=7, color="tab:orange")
        for a in (ax, av):
            a.tick_params(labelsize=6)
        self._canvas.draw_idle()

    def _browse(self):
        path, _ = QFileDialog.getSaveFileName(self, "Save the model as", self.model_path.text(), "*.pt")
        if path:
            self.model_path.setText(path)

    def _refresh_layers(self, *_):
        from napari.layers import Image, Labels

        for combo, kind in ((self.image_combo, Image), (self.labels_combo, Labels)):
            current = combo.currentText()
            names = [layer.name for layer in self.viewer.layers if isinstance(layer, kind)]
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def _set_busy(self, busy: bool):
        for b in (self.train_btn, self.retrain_btn, self.densify_btn, self.new_labels_btn, self.template_btn):
            b.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)
        if busy:
            self._timer.start()
        else:
            self._timer.stop()

    def _layer(self, combo, what):
        name = combo.currentText()
        if not name or name not in self.viewer.layers:
            raise SparsesegError(f"pick {what} first")
        return self.viewer.layers[name]

    def image_layer(self):
        return self._layer(self.image_combo, "an image layer")

    def labels_layer(self):
        return self._layer(self.labels_combo, "a sparse labels layer (or press 'New sparse labels')")

    @staticmethod
    def _level0(layer):
        return layer.data[0] if getattr(layer, "multiscale", False) else layer.data

    def _image_array(self, layer) -> np.ndarray:
        data = self._level0(layer)
        if getattr(layer, "rgb", False):
            raise SparsesegError(f"{layer.name}: RGB layers are not supported; open the channels as (C, Z, Y, X)")
        if data.ndim == 3:
            return np.asarray(data, dtype=np.float32)[None]
        if data.ndim == 4:
            return np.asarray(data, dtype=np.float32)
        raise SparsesegError(f"{layer.name}: a 3D image (Z, Y, X) or (C, Z, Y, X) is needed, got shape {data.shape}")

    @staticmethod
    def _spatial_shape(layer):
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        return tuple(int(s) for s in data.shape[-3:])

    @staticmethod
    def _voxel(layer):
        scale = tuple(float(s) for s in layer.scale[-3:])
        return None if all(s == 1.0 for s in scale) else scale

    # ------------------------------------------------------------------ actions

    def new_sparse_labels(self):
        """A labels layer of the image's shape, every voxel 'unannotated' (255, transparent)."""
        image = self.image_layer()
        shape = self._spatial_shape(image)
        if len(self._level0(image).shape) not in (3, 4):
            raise SparsesegError(f"{image.name}: a 3D image is needed, got shape {self._level0(image).shape}")
        layer = self.viewer.add_labels(np.full(shape, IGNORE_LABEL, np.uint8), name=f"{image.name} sparse labels",
                                       scale=image.scale[-3:], translate=image.translate[-3:],
                                       colormap=labels_colormap(2), metadata={"class_names": []})
        layer.selected_label = 1
        layer.brush_size = 5
        self.labels_combo.setCurrentText(layer.name)
        self.status.setText("paint class 0 (background) and classes 1, 2 … on a few slices; "
                            "unpainted voxels stay 'unannotated'")
        return layer

    def open_template(self, path=None):
        """Open a `sparseseg-suggest --template` labels volume as the sparse labels layer (painting
        writes straight into it, so the template file is the annotation), and list its suggested
        slices in the 'suggested slice' box; choosing one shows that slice."""
        import zarr

        from sparseseg.suggest.planes import PLANES

        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Open a sparseseg-suggest template", str(Path.cwd()))
            if not path:
                return None
        p = Path(path)
        try:
            group = zarr.open_group(str(p), mode="r+")
        except Exception:  # not a zarr group, or not writable: one line, whatever zarr raised
            raise SparsesegError(f"{p}: not a writable zarr group (expected `sparseseg-suggest --template` output)") \
                from None
        attrs = dict(group.attrs)
        meta = attrs.get("sparseseg") or {}
        if meta.get("kind") != "annotation-template":
            raise SparsesegError(f"{p} is not a template written by `sparseseg-suggest --template`")
        if int(meta.get("ignore_label", IGNORE_LABEL)) != IGNORE_LABEL:
            raise SparsesegError(f"{p} marks unannotated voxels with {meta['ignore_label']}; this widget paints "
                                 f"with {IGNORE_LABEL}: write the template again with --ignore-label {IGNORE_LABEL}")
        ms = (attrs.get("ome") or {}).get("multiscales") or [{}]
        level0 = ms[0].get("datasets", [{"path": "0"}])[0]
        arr = group[level0["path"]]
        scale = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t["type"] == "scale"),
                     [1.0, 1.0, 1.0])[-3:]
        translate = [0.0, 0.0, 0.0]
        if not self.image_combo.currentText():
            self._open_template_image(meta.get("image"), p)
        if self.image_combo.currentText():
            image = self.image_layer()
            if self._spatial_shape(image) != tuple(arr.shape):
                raise SparsesegError(f"template {p.name} has shape {tuple(arr.shape)}, image '{image.name}' has "
                                     f"{self._spatial_shape(image)}: was it suggested for another image?")
            scale, translate = image.scale[-3:], image.translate[-3:]
        slices = [s for s in meta.get("suggested_slices", []) if s.get("plane") in PLANES]
        layer = self.viewer.add_labels(arr, name=f"{p.name.split('.')[0]} sparse labels", scale=scale,
                                       translate=translate, colormap=labels_colormap(2),
                                       metadata={"class_names": [], "path": str(p), "suggested_slices": slices})
        layer.selected_label = 1
        layer.brush_size = 5
        self.labels_combo.setCurrentText(layer.name)
        self.suggestions.blockSignals(True)
        self.suggestions.clear()
        for s in slices:
            axis = "zyx"[PLANES[s["plane"]]]
            gain = f", gain {s['gain']:.3g}" if s.get("gain") is not None else ""
            self.suggestions.addItem(f"{s['plane']}: {axis}={s['index']}{gain}", dict(s))
        self.suggestions.blockSignals(False)
        self._template_layer = layer
        if slices:
            self.go_to_suggestion(0)
        self.status.setText(f"{len(slices)} suggested slices from {p.name}; paint them (painting writes into the "
                            "template), then train")
        return layer

    def _open_template_image(self, image, template: Path) -> None:
        """No image layer yet: open the image the template was suggested for, when it is still
        where `sparseseg-suggest` read it (as given, or beside the template)."""
        if not image:
            return
        for cand in (Path(image), template.parent / image):
            if cand.exists():
                try:
                    self.viewer.open(str(cand), plugin="sparseseg")
                except Exception as e:  # noqa: BLE001 - the template opens without its image
                    log.warning("could not open the template's image %s: %s", cand, e)
                    return
                self._refresh_layers()
                return

    def go_to_suggestion(self, index: int | None = None):
        """Show suggested slice `index` (default: the one chosen in the box) in 2D: its plane on
        screen, the viewer at its position."""
        from sparseseg.suggest.planes import PLANES

        if index is not None and index != self.suggestions.currentIndex():
            self.suggestions.setCurrentIndex(index)    # its signal comes back here
            return
        s = self.suggestions.currentData()
        layer = getattr(self, "_template_layer", None)
        if not s or layer is None or layer not in self.viewer.layers:
            return
        fixed = PLANES[s["plane"]]
        dims = self.viewer.dims
        lead = dims.ndim - 3                      # the layer's axes are the viewer's last three
        shown = [a for a in range(3) if a != fixed]
        dims.ndisplay = 2
        dims.order = tuple(range(lead)) + (lead + fixed, lead + shown[0], lead + shown[1])
        world = float(layer.translate[-3:][fixed]) + int(s["index"]) * float(layer.scale[-3:][fixed])
        dims.set_point(lead + fixed, world)

    def _training_volume(self):
        from sparseseg.trainer.data import TrainingVolume

        image, labels = self.image_layer(), self.labels_layer()
        ishape, lshape = self._spatial_shape(image), tuple(self._level0(labels).shape)
        if ishape != lshape:
            raise SparsesegError(f"labels layer '{labels.name}' has shape {lshape}, image '{image.name}' has {ishape}")
        lab = np.asarray(self._level0(labels))
        if lab.size and (lab.min() < 0 or lab.max() > 255):
            raise SparsesegError(f"labels layer '{labels.name}': values must lie in 0..255")
        if not (lab != IGNORE_LABEL).any():
            raise SparsesegError(f"labels layer '{labels.name}' has no annotated voxel: paint a few slices first")
        return TrainingVolume(self._image_array(image), lab.astype(np.uint8), image.name, self._voxel(image))

    def start_training(self, retrain: bool = False):
        """Train (or continue from the last model with the corrected labels) in a background worker."""
        from napari.qt.threading import thread_worker

        from sparseseg.trainer.options import build_configs
        from sparseseg.trainer.preview import predict_plane
        from sparseseg.trainer.train import train

        if self._worker is not None:
            raise SparsesegError("busy: wait for the running job or cancel it")
        out = Path(self.model_path.text()).expanduser()
        if not out.parent.is_dir():
            raise SparsesegError(f"model folder does not exist: {out.parent}")
        vol = self._training_volume()
        opts = default_options(preset=self.preset.currentText(), device=self.device.currentText(),
                               time_budget=float(self.budget.value()),
                               val_fraction=float(self.val_fraction.value()))
        labels_meta = self.labels_layer().metadata or {}
        resume = None
        if retrain:
            from sparseseg.model.checkpoint import load_checkpoint

            if self.last_model is None or not self.last_model.is_file():
                raise SparsesegError("no model to continue from: train first")
            ck = load_checkpoint(self.last_model)
            # Same classes as the model being continued, whatever this labels layer holds.
            # A new budget from where it stands.
            opts.update(num_classes=ck.model_config.num_classes, class_names=",".join(ck.class_names))
            resume = str(self.last_model)
            out = self.last_model
        else:
            if out.exists() and out != self.last_model:
                raise SparsesegError(f"{out} exists; choose another model path, or 'Retrain from here'")
            names = labels_meta.get("class_names") or []
            if names:
                opts["class_names"] = ",".join(names)
        opts.update(self.extra_options)
        mcfg, tcfg, names = build_configs([vol], opts)
        if retrain and mcfg != ck.model_config:
            raise SparsesegError("this image and labels plan a different network than the last model "
                                 "(another image size, channel count or preset?); train afresh instead")
        self._history = [] if not retrain else list(self._history)
        self._stop = False
        start = ck.iteration if retrain else 0
        self._progress_start = start
        self.progress.setRange(start, tcfg.iterations) if tcfg.iterations else self.progress.setRange(0, 0)
        self.progress.setValue(start)         # a budgeted run shows "busy" until its first plan

        def on_step(entry):
            self._history.append(dict(entry))
            return self._stop

        def preview(model):
            view = self._view
            if view is not None:
                plane = predict_plane(model, vol.image, *view)
                if plane is not None:
                    self._preview = (*view, plane)

        self._update_view()
        worker = thread_worker(train, start_thread=False, ignore_errors=True)(
            [vol], mcfg, tcfg, names, out_path=out, resume=resume, progress=False, on_step=on_step,
            preview=(self.preview_seconds, preview))
        worker.returned.connect(self._trained)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._set_busy(True)
        self.status.setText(("continuing" if retrain else "training") + f" to {out} …")
        worker.start()
        return worker

    def _trained(self, result):
        self.last_model = Path(result.checkpoint)
        stopped = " (stopped early)" if self._stop else ""
        self.status.setText(f"trained {result.iterations} iterations{stopped} in {result.seconds:.0f} s, loss "
                            f"{result.final_loss:.4f}: {self.last_model}")
        self._draw_curve()

    def _failed(self, exc):
        notify_error(exc)
        self.status.setText(f"failed: {first_line(exc)}")

    def _finished(self):
        self._poll()
        self._densify_out = None
        self._worker = None
        self._set_busy(False)

    def cancel(self):
        """Stop training after the current iteration; the checkpoint is still saved."""
        self._stop = True
        self.status.setText("stopping after this iteration …")

    def _poll(self):
        """GUI-thread timer: progress, curve, the live prediction, and the densify layer as blocks land."""
        self._update_view()
        self._show_preview()
        if self._history:
            entry = self._history[-1]
            planned = entry.get("planned")          # a budgeted run's plan, once made
            if planned and self.progress.maximum() != planned:
                self.progress.setRange(self._progress_start, planned)
            if self.progress.maximum():
                self.progress.setValue(min(entry["iteration"], self.progress.maximum()))
            if self._worker is not None and planned:
                self.status.setText(plan_text(entry, self._progress_start))
            self._draw_curve()
        out = self._densify_out
        if out is not None:
            self._show_dense(out)

    def _update_view(self):
        """The slice on screen, in the image's voxels, for the training thread's preview."""
        try:
            image = self.image_layer()
        except SparsesegError:
            self._view = None
            return
        dims = self.viewer.dims
        if dims.ndisplay != 2:
            self._view = None
            return
        axis = dims.order[-3] - (dims.ndim - 3)
        index = int(round(float(image.world_to_data(dims.point)[-3:][axis])))
        self._view = (axis, index) if 0 <= axis < 3 else None

    def _show_preview(self):
        """The latest live prediction, one slice of a "live prediction" labels layer."""
        got, self._preview = self._preview, None
        if got is None:
            return
        axis, index, plane = got
        image = self.image_layer()
        shape = self._spatial_shape(image)
        layer = self.preview_layer
        if layer is None or layer not in self.viewer.layers or tuple(layer.data.shape) != shape:
            layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name=f"{image.name} live prediction",
                                           scale=image.scale[-3:], translate=image.translate[-3:], opacity=0.4)
            self.preview_layer = layer
        index_ = [slice(None)] * 3
        index_[axis] = index
        layer.data[tuple(index_)] = plane
        layer.refresh()

    # ------------------------------------------------------------------ densify

    def _densify_input(self, image) -> str:
        """The image's own file when the engine can read it unchanged, else a temporary OME-Zarr."""
        from sparseseg.volume import create_ome_zarr, open_volume

        src = getattr(getattr(image, "source", None), "path", None)
        data = self._level0(image)
        if src:
            try:
                vol = open_volume(src)
                channels = data.shape[0] if data.ndim == 4 else 1
                if vol.shape == self._spatial_shape(image) and vol.channels == channels:
                    return str(src)
            except SparsesegError:
                pass
        path = self._workdir / f"{image.name.replace('/', '_')}_input_{self._densify_count}.zarr"
        chunks = tuple(min(s, 64) for s in data.shape[:-2]) + tuple(min(s, 256) for s in data.shape[-2:])
        arr = create_ome_zarr(path, data.shape, np.dtype(data.dtype).name if np.dtype(data.dtype).kind in "uif"
                              else "float32", chunks, self._voxel(image), name=image.name)
        if hasattr(data, "store") or type(data).__module__.startswith("dask"):
            import dask.array as da

            da.store(da.asarray(data).rechunk(chunks), arr, lock=False)
        else:
            arr[...] = np.asarray(data)
        return str(path)

    def start_densify(self):
        """Predict the whole image through the engine; the result layer fills block by block."""
        from napari.qt.threading import thread_worker

        from sparseseg.engine.run import run_inference

        if self._worker is not None:
            raise SparsesegError("busy: wait for the running job or cancel it")
        model = self.last_model or Path(self.model_path.text()).expanduser()
        if not Path(model).is_file():
            raise SparsesegError("no model yet: train first (or point 'model' at a checkpoint)")
        image = self.image_layer()
        folder = Path(model).parent
        if self.beside_image.isChecked():
            folder = self._label_folder(image)
        source = self._densify_input(image)
        self._densify_count += 1
        stem = image.name.replace("/", "_")
        suffix = "" if self.beside_image.isChecked() else ".zarr"
        out = folder / f"{stem}_dense_{self._densify_count}{suffix}"
        while out.exists():
            self._densify_count += 1
            out = folder / f"{stem}_dense_{self._densify_count}{suffix}"
        self.dense_layer = None
        self._densify_out = out
        self._densify_image = image
        self._densify_t0 = time.time()
        self.progress.setRange(0, 0)          # busy: blocks land in no fixed order
        worker = thread_worker(run_inference, start_thread=False, ignore_errors=True)(
            str(model), source, str(out), workers=0, overwrite=False, device=self.device.currentText(),
            probabilities="uint8" if self.probabilities.isChecked() else None, progress=False)
        worker.returned.connect(self._densified)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self._worker = worker
        self._set_busy(True)
        self.cancel_btn.setEnabled(False)     # the engine runs to the end; finished blocks are kept
        self.status.setText(f"densifying into {out} …")
        worker.start()
        return worker

    def _label_folder(self, image) -> Path:
        """IMAGE.zarr/labels for an image layer opened from an NGFF 0.5 OME-Zarr image group."""
        from sparseseg.labels_zarr import label_levels

        src = getattr(getattr(image, "source", None), "path", None)
        if not src or not Path(src).is_dir():
            raise SparsesegError(f"'{image.name}' was not opened from an OME-Zarr image: untick 'as a label image'")
        label_levels(src, self._spatial_shape(image))      # an NGFF 0.5 image of this shape, else one line
        return Path(src) / "labels"

    def _show_dense(self, out: Path):
        import zarr

        if self.dense_layer is None:
            if not (out / "0" / "zarr.json").is_file():
                return
            try:
                arr = zarr.open_array(str(out / "0"), mode="r")
                names = dict(zarr.open_group(str(out), mode="r").attrs).get("sparseseg_run", {}).get("class_names")
            except Exception:  # the engine is still creating the store
                return
            image = self._densify_image
            self.dense_layer = self.viewer.add_labels(
                arr, name=f"{image.name} dense", scale=image.scale[-3:], translate=image.translate[-3:],
                colormap=labels_colormap(len(names or [0, 1]), ignore_label=None),
                metadata={"class_names": list(names or []), "path": str(out)}, opacity=0.5)
        else:
            self.dense_layer.refresh()
        from sparseseg.engine.store import DONE_DIR

        done = out / DONE_DIR
        n = sum(1 for _ in done.iterdir()) if done.is_dir() else 0
        self.status.setText(f"densifying into {out}: {n} blocks written")

    def _densified(self, summary):
        import dask.array as da
        import zarr

        out = Path(summary["output"])
        self._show_dense(out)
        self._densify_out = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        group = zarr.open_group(str(out), mode="r")
        if "probabilities" in group:
            prob = group["probabilities"]
            if isinstance(prob, zarr.Group):      # beside a multiscale image: an image of its own
                prob = prob["0"]
            names = dict(group.attrs).get("sparseseg_run", {}).get("class_names") or [str(i) for i in
                                                                                     range(prob.shape[0])]
            image = self._densify_image
            self.viewer.add_image(da.from_zarr(prob), channel_axis=0, name=[f"p({n})" for n in names],
                                  scale=image.scale[-3:], translate=image.translate[-3:], blending="additive",
                                  contrast_limits=[0, 255], visible=[i > 0 for i in range(prob.shape[0])])
        self.status.setText(f"densified {summary['voxels']} voxels in {summary['seconds']:.1f} s "
                            f"({summary['backend']} on {summary['device']}): {out}. Paint corrections on the "
                            "sparse labels, then 'Retrain from here'.")
