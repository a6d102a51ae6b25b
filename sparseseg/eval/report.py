"""The HTML report of `sparseseg-eval --report`, one self-contained page.

It holds IoU per class, the orthogonal-view figure, the annotated slices beside the prediction,
and the training curve when a checkpoint's history is given."""

from __future__ import annotations

import base64
import html
import io
import json

import zarr

from sparseseg.eval.figure import class_colours, class_count, draw_annotated_slices, draw_curve, draw_figure
from sparseseg.model.checkpoint import load_checkpoint
from sparseseg.volume import split_store_path


def _png(draw, *args, **kw) -> str | None:
    buf = io.BytesIO()
    if draw(buf, *args, **kw) is None:
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(path, pred, labels, result: dict, ignore_label=255, image=None, class_names=None, history=None,
                 sources: dict | None = None):
    """One self-contained HTML page (images inline) for a run's evaluation."""
    k = class_count(pred, labels, ignore_label, class_names)
    names = list(class_names or []) + [f"class {i}" for i in range(len(class_names or []), k)]
    colours = class_colours(k)
    mf = result.get("mean_foreground_iou")
    rows = []
    for c, v in enumerate(result["iou"]):
        swatch = "transparent" if c == 0 else "rgb(%d,%d,%d)" % tuple(int(255 * x) for x in colours[c][:3])
        rows.append(f"<tr><td><span class='sw' style='background:{swatch}'></span>{html.escape(names[c])}</td>"
                    f"<td>{'n/a' if v is None else f'{v:.4f}'}</td></tr>")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sparseseg evaluation</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{padding:4px 12px;border-bottom:1px solid #ddd}"
        ".sw{display:inline-block;width:12px;height:12px;margin-right:6px;border:1px solid #999}"
        "img{max-width:100%}</style></head><body>",
        "<h1>sparseseg evaluation</h1>",
        "<p>IoU = TP / (TP + FP + FN) over annotated voxels "
        f"({result.get('voxels', 'n/a')} voxels; value {ignore_label} = not annotated).</p>",
        "<table><tr><th>class</th><th>IoU</th></tr>" + "".join(rows)
        + f"<tr><th>mean foreground</th><th>{'n/a' if mf is None else f'{mf:.4f}'}</th></tr></table>",
    ]
    if sources:
        parts.append("<p>" + "<br>".join(f"{html.escape(k_)}: <code>{html.escape(str(v))}</code>"
                                         for k_, v in sources.items()) + "</p>")
    fig = _png(draw_figure, pred, labels, ignore_label, image, None, names)
    parts.append(f"<h2>Orthogonal views</h2><img src='data:image/png;base64,{fig}'>")
    sl = _png(draw_annotated_slices, pred, labels, ignore_label, image, names)
    if sl:
        parts.append(f"<h2>Annotated slices</h2><img src='data:image/png;base64,{sl}'>")
    if history:
        parts.append(f"<h2>Training</h2><img src='data:image/png;base64,{_png(draw_curve, history)}'>")
    parts.append("<details><summary>raw result (JSON)</summary><pre>"
                 + html.escape(json.dumps(result, indent=1)) + "</pre></details></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


def class_names_of(pred_path, model_path=None):
    """(class names, training history) from a checkpoint, else the names a sparseseg output
    records in its attributes; (None, None) when neither says."""
    if model_path:
        ck = load_checkpoint(model_path)
        return list(ck.class_names), ck.extra.get("history")
    try:
        attrs = dict(zarr.open_group(split_store_path(str(pred_path))[0], mode="r").attrs)
    except Exception:  # not a zarr group (TIFF, .npy, a bare array): no names recorded
        return None, None
    names = (attrs.get("sparseseg_run") or {}).get("class_names") or (attrs.get("sparseseg") or {}).get("class_names")
    return (list(names) if names else None), None
