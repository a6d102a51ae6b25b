"""Real walltime kills: `sparseseg-infer --cluster slurm --jobs 2 --walltime 1` on a run that needs
several minutes of job time (a block delay), against a one-node SLURM on loopback
(tests/slurm_local.py). SLURM ends each job at its limit (state TIMEOUT); the run must submit
replacements and finish with the labels of a local run. Too slow for the suite (3-4 minutes):
tests/test_slurm.py uses scancel, which SLURM ends jobs with the same way.

    python benchmarks/slurm_walltime.py --out benchmarks/results/slurm_walltime.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # run as `python benchmarks/slurm_walltime.py`
    sys.path.insert(0, _ROOT)
from benchmarks.record import record  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--delay", type=float, default=8.0, help="seconds added to each block (SPARSESEG_BLOCK_DELAY)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import numpy as np

    from sparseseg.volume import open_volume
    from tests.helpers import tiny_engine_and_volume
    from tests.slurm_local import LocalSlurm

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, LocalSlurm() as slurm:
        d = Path(tmp)
        engine, inp, _ = tiny_engine_and_volume(d)
        env = {**os.environ, **slurm.env, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        base = [sys.executable, "-m", "sparseseg.cli", "infer", "--engine", str(engine), str(inp), "--block",
                "8,16,16", "--json"]
        r = subprocess.run(base + ["--output", str(d / "ref.zarr"), "--workers", "0"], env=env, cwd=d,
                           capture_output=True, text=True, check=True)
        t0 = time.time()
        p = subprocess.Popen(base + ["--output", str(d / "o.zarr"), "--cluster", "slurm", "--jobs", "2", "--walltime", "1"],
                             env={**env, "SPARSESEG_BLOCK_DELAY": str(args.delay)}, cwd=d, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        states: dict[str, list] = {}
        while p.poll() is None:
            for line in slurm.run("squeue", "-h", "-t", "all", "-o", "%i|%T").stdout.split():
                jid, state = line.split("|")
                if not states.get(jid) or states[jid][-1] != state:
                    states.setdefault(jid, []).append(state)
            time.sleep(1)
        stdout, stderr = p.communicate()
        seconds = time.time() - t0
        summary = json.loads(stdout.strip().splitlines()[-1])
        same = bool(np.array_equal(open_volume(d / "o.zarr").read_labels(), open_volume(d / "ref.zarr").read_labels()))
        left = slurm.jobs()
    result = {"benchmark": "walltime kills survived: --cluster slurm --jobs 2 --walltime 1 on a run of 18 blocks of "
                           f"8x16x16 with {args.delay:g} s added per block",
              **record(load_before=load), "exit_status": p.returncode, "seconds": round(seconds, 1),
              "job_states_seen": states, "jobs_timed_out": sum("TIMEOUT" in s for s in states.values()),
              "slurm_log_lines": [ln.split(": ", 1)[-1] for ln in stderr.splitlines() if "SLURM" in ln],
              "other_log_lines": [ln for ln in stderr.splitlines() if "SLURM" not in ln and " blocks " not in ln][:40],
              "blocks_computed": summary["blocks_computed"], "blocks_failed": summary["blocks_failed"],
              "labels_identical_to_local_run": same, "jobs_left_in_queue": len(left)}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
