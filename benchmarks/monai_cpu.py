"""sparseseg-infer against MONAI sliding_window_inference: same same-padding network, same
volume, same threads, Gaussian blending with the same overlap.

Each tool runs end to end (zarr in -> zarr out) in its own process so peak RSS is its own.
sparseseg runs twice per engine: on the volume as one block (its default here) and on several
blocks (`--blocks`), where tiles of the global grid at block borders are computed twice; the
recomputed fraction is printed beside it. `model.pt (default)` is what `--engine model.pt`
does on CPU (ONNX Runtime through the export cache); `--backend torch` pins PyTorch.
MONAI holds the whole volume and a float32 (K, Z, Y, X) output buffer in memory;
sparseseg-infer streams blocks. The network is the `small` preset in same padding, trained
briefly on the ISBI EM stack so that the labels mean something.

    python benchmarks/monai_cpu.py --out benchmarks/results/monai_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np


# Peak RSS from VmHWM: ru_maxrss would carry over the parent's high-water mark across fork+exec.
PEAK = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024"

RUN_MONAI = """
import json, sys, time, numpy as np, torch, zarr
from monai.inferers import sliding_window_inference
import sparseseg
torch.set_num_threads(int(sys.argv[5]))
t0 = time.time()
model = sparseseg.load_model(sys.argv[1])
image = torch.from_numpy(np.asarray(zarr.open_array(sys.argv[2], mode="r")[...], np.float32))[None, None]
roi = tuple(int(v) for v in sys.argv[4].split(","))
with torch.inference_mode():
    logits = sliding_window_inference(image, roi, 1, model, overlap=float(sys.argv[6]), mode="gaussian",
                                      sigma_scale=0.125)
labels = logits[0].argmax(0).numpy().astype(np.uint8)
zarr.save_array(sys.argv[3], labels)
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": PEAK}))
""".replace("PEAK", PEAK)

RUN_SPARSESEG = """
import json, sys, time
import torch
from sparseseg.engine.run import run_inference

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/monai_cpu.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import data_dir, record  # noqa: E402

DATA = data_dir() / "isbi2012_em"
torch.set_num_threads(int(sys.argv[5]))
t0 = time.time()
tile = tuple(int(v) for v in sys.argv[4].split(","))
block = tuple(int(v) for v in sys.argv[7].split(","))
s = run_inference(sys.argv[1], sys.argv[2], sys.argv[3], workers=0, tile=tile, block=block,
                  overlap=float(sys.argv[6]), progress=False, backend=sys.argv[8], device="cpu",
                  precision=sys.argv[9])
plan = run_inference(sys.argv[1], sys.argv[2], None, tile=tile, block=block, overlap=float(sys.argv[6]),
                     backend=sys.argv[8], device="cpu", dry_run=True)
print(json.dumps({"seconds": time.time() - t0, "peak_rss_mb": PEAK, "backend": s["backend"], "block": list(block),
                  "blocks": s["blocks"], "recomputed_fraction": plan["recomputed_fraction"]}))
""".replace("PEAK", PEAK)


def run(script, *args):
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="30,256,256", help="crop of the ISBI stack (Z,Y,X)")
    ap.add_argument("--tile", default="16,128,128")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-iterations", type=int, default=60)
    ap.add_argument("--blocks", default="16,128,128", help="block size of the several-blocks runs")
    ap.add_argument("--backends", default="model.pt:auto,model.pt:torch,model.onnx:onnxruntime,model.onnx:openvino",
                    help="engine:backend[:precision] to run (openvino is skipped when not installed); "
                         "labels are also compared with the first one's on the same blocks")
    ap.add_argument("--out", default="benchmarks/results/monai_cpu.json")
    a = ap.parse_args()

    import torch
    import zarr

    from sparseseg.cli import main as cli_main  # noqa: F401  (import check)
    from sparseseg.model.config import plan_model
    from sparseseg.trainer.config import TrainConfig
    from sparseseg.trainer.data import TrainingVolume
    from sparseseg.trainer.train import train
    from sparseseg.volume import open_volume

    torch.set_num_threads(a.threads)
    shape = tuple(int(v) for v in a.shape.split(","))
    image = open_volume(DATA / "isbi2012_train_image_zyx.tif").read(dtype=np.float32)[:, :shape[0], :shape[1], :shape[2]]
    labels = open_volume(DATA / "isbi2012_train_label_zyx.tif").read_labels()[:shape[0], :shape[1], :shape[2]]
    work = Path(tempfile.mkdtemp(prefix="sparseseg-bench-"))
    cfg = plan_model("small", 1, 2, padding="same", shape=shape)
    sparse = np.full_like(labels, 255)
    sparse[::6] = labels[::6]
    train([TrainingVolume(image, sparse, "isbi")], cfg,
          TrainConfig(iterations=a.train_iterations, device="cpu", checkpoint_every=0, patch_output=(16, 96, 96)),
          ["interior", "membrane"], out_path=work / "model.pt", progress=False)
    vol = zarr.create_array(str(work / "volume.zarr"), shape=shape, chunks=(32, 256, 256), dtype="float32")
    vol[...] = image[0]
    from click.testing import CliRunner

    from sparseseg.cli import main as cli

    assert CliRunner().invoke(cli, ["export", str(work / "model.pt")]).exit_code == 0

    import os

    results = {**record(), "threads": a.threads,
               "load_average_before": list(os.getloadavg()), "volume": list(shape), "tile": a.tile, "overlap": a.overlap,
               "network": "small preset, same padding", "runs": {}}
    m = run(RUN_MONAI, work / "model.pt", work / "volume.zarr", work / "monai.zarr", a.tile, a.threads, a.overlap)
    results["runs"]["monai"] = m
    ref = np.asarray(zarr.open_array(str(work / "monai.zarr"), mode="r")[...])
    voxels = int(np.prod(shape))
    import importlib.util

    first = {}
    for triple in a.backends.split(","):
        engine, backend, precision = (triple.split(":") + ["fp32"])[:3]
        if (backend == "openvino" or precision == "bf16") and importlib.util.find_spec("openvino") is None:
            continue
        for block in (a.shape, a.blocks):
            out = work / f"out_{engine}_{backend}_{precision}_{block}.zarr"
            s = run(RUN_SPARSESEG, work / engine, work / "volume.zarr", out, a.tile, a.threads, a.overlap, block,
                    backend, precision)
            got = open_volume(out).read_labels()
            s["label_agreement_with_monai"] = float((got == ref).mean())
            first.setdefault(block, (triple, got))
            s[f"label_agreement_with {first[block][0]}"] = float((got == first[block][1]).mean())
            s["speedup_vs_monai"] = m["seconds"] / s["seconds"]
            name = (f"sparseseg ({engine}, {'default' if backend == 'auto' else backend}"
                    f"{'' if precision == 'fp32' else ' ' + precision}, {s['blocks']} block(s))")
            results["runs"][name] = s
    results["load_average_after"] = list(os.getloadavg())
    for name, r in results["runs"].items():
        r["voxels_per_second"] = voxels / r["seconds"]
        print(f"{name:48s} {r['seconds']:7.1f} s {r['voxels_per_second']:10.0f} voxels/s  peak RSS "
              f"{r['peak_rss_mb']:7.0f} MB" + (f"  {r['speedup_vs_monai']:.2f}x MONAI, labels agree "
                                                f"{100 * r['label_agreement_with_monai']:.3f}%, recomputed "
                                                f"{r['recomputed_fraction']:.2f}"
                                                if "speedup_vs_monai" in r else ""))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"-> {a.out}  (machine: {results['machine']}, {results['date']})")


if __name__ == "__main__":
    main()
