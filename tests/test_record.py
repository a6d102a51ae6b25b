"""benchmarks/record.py: the record every benchmark result carries."""
from pathlib import Path

from benchmarks import record as rec

ROOT = Path(__file__).resolve().parents[1]


def test_record_names_command_commit_machine_and_versions(monkeypatch):
    r = rec.record(argv=[str(ROOT / "benchmarks" / "x.py"), "--shape", "30,512,512", "--tag", "a b"],
                   load_before=(1.0, 2.0, 3.0))
    assert r["command"] == "python benchmarks/x.py --shape 30,512,512 --tag 'a b'"   # from the repository root
    assert r["commit"].split("+")[0] and r["commit"] != "unknown"
    assert set(r["machine"]) >= {"cpu", "cores", "cpu_features", "gpu"}
    assert set(r["machine"]["cpu_features"]) == set(rec.CPU_FEATURES)
    assert {"torch", "onnxruntime", "openvino"} <= set(r["versions"])
    assert r["load_before"] == [1.0, 2.0, 3.0] and len(r["load_after"]) == 3


def test_cpu_features_come_from_the_flags(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512f avx512_bf16 sse\n")
    real = Path

    monkeypatch.setattr(rec, "Path", lambda p, *a: real(info) if p == "/proc/cpuinfo" else real(p, *a))
    m = rec.machine()
    assert m["cpu"] == "Test CPU 9000"
    assert m["cpu_features"] == {"avx512f": True, "avx512_bf16": True, "amx_bf16": False, "amx_tile": False,
                                 "amx_int8": False}


def test_data_defaults_beside_the_repository(monkeypatch):
    monkeypatch.delenv("SPARSESEG_DATA", raising=False)
    assert rec.data_dir() == ROOT.parent / "shared" / "data"
    monkeypatch.setenv("SPARSESEG_DATA", "/elsewhere")
    assert rec.data_dir() == Path("/elsewhere")
