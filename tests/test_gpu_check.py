"""benchmarks/gpu_check.sh on CPU: the script parses, and its Python steps run up to their first
CUDA need, each leaving one record that says why it was skipped; the merge makes one JSON."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_script_parses_and_caps_every_step():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    steps = [ln for ln in SCRIPT.read_text().splitlines() if ln.strip().startswith("step ")]
    caps = [int(ln.split()[1]) for ln in steps]
    assert len(steps) == 6 and sum(caps) + 2 * 30 <= 9 * 60       # the nvcc step runs once per .cu file


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the steps run for real")
@pytest.mark.parametrize("name", ["race", "compare", "paper"])
def test_cuda_steps_record_why_they_are_skipped(capsys, name):
    getattr(gpu_check, name)()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RECORD ")]
    assert len(lines) == 1
    rec = json.loads(lines[0][7:])
    assert rec["step"] == name and "needs a CUDA GPU" in rec["skipped"]


def test_versions_and_merge_make_one_json(tmp_path, capsys):
    gpu_check.versions()
    out = capsys.readouterr().out
    rec = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RECORD "))[7:])
    assert rec["torch"] == torch.__version__
    log = tmp_path / "x.log"
    log.write_text(out + "=== rc=0 versions\n"
                   'RECORD {"step": "compare", "padding": "valid", "agreement": 0.99, "passed": false}\n'
                   "=== rc=124 paper\n")
    gpu_check.merge(str(log), str(tmp_path / "x.json"), "NVIDIA H200")
    res = json.loads((tmp_path / "x.json").read_text())
    assert res["device"] == "NVIDIA H200" and res["passed"] is False
    assert res["step_status"] == {"versions": 0, "paper": 124}
    assert {f["step"] for f in res["failed"]} == {"compare", "paper"}
