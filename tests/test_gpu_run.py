"""The GPU run's ``--tiny`` mode on the CPU: every stage in order, results written after each, under 3 minutes;
a stage past the budget is skipped, not run."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_run  # noqa: E402

ORDER = ["system", "kernel_tests", "defaults_1024", "cuda_graph_decode", "compiled_dit_block"]


def test_tiny_run_completes_every_stage_in_under_3_minutes(tmp_path):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--tiny", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert elapsed < 180, elapsed
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert list(report["stages"]) == ORDER
    required = ORDER[:3]
    assert all(report["stages"][s]["status"] == "passed" for s in required), report["stages"]
    assert report["stages"]["system"]["result"]["torch"]
    table = report["stages"]["defaults_1024"]["result"]["table"]
    table = "\n".join(table) if isinstance(table, list) else table
    assert "AR tokens/s" in table and "Decoder s/step (CFG)" in table and "VAE" in table and "End to end" in table
    assert "Reference" in table  # the pack and the reference in the same run
    assert "## GPU run" in (tmp_path / "performance_gpu.md").read_text()


def test_stages_past_the_budget_are_skipped_and_results_written_each_time(tmp_path, monkeypatch):
    calls, clock = [], [0.0]
    monkeypatch.setattr(gpu_run.time, "perf_counter", lambda: clock[0])

    def fake_run(stage, timeout, out):
        calls.append((stage.name, timeout))
        clock[0] += 15  # each stage takes 15 s
        written = json.loads((tmp_path / "gpu_run.json").read_text()) if calls[1:] else None
        return {"status": "passed", "seconds": 0.2, "seen_before": written and list(written["stages"])}

    monkeypatch.setattr(gpu_run, "run_stage", fake_run)
    # 60 s of budget: the required stages run (their timeouts cut to what is left); 15 s are left, less than
    # either optional stage's timeout
    assert gpu_run.main(["--tiny", "--out", str(tmp_path), "--budget", "60"]) == 0
    report = json.loads((tmp_path / "gpu_run.json").read_text())
    assert [name for name, _ in calls] == ORDER[:3] and all(t <= 60 for _, t in calls)
    assert report["stages"]["kernel_tests"]["seen_before"] == ["system"]  # saved after the first stage
    assert report["stages"]["cuda_graph_decode"]["status"].startswith("skipped")
    assert report["stages"]["compiled_dit_block"]["status"].startswith("skipped")


def test_a_relative_out_is_the_folder_under_the_callers_directory(tmp_path, monkeypatch):
    """The stages run in the repository root: a relative --out given from elsewhere must still be where they write."""
    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_run(stage, timeout, out):
        seen.append((stage, out))
        return {"status": "passed", "seconds": 0.1}

    monkeypatch.setattr(gpu_run, "run_stage", fake_run)
    assert gpu_run.main(["--tiny", "--out", "relative"]) == 0
    assert [out for _, out in seen] == [str(tmp_path / "relative")] * len(ORDER)
    assert all(stage.result.startswith(str(tmp_path / "relative")) for stage, _ in seen if stage.result)
    assert (tmp_path / "relative" / "gpu_run.json").is_file()
