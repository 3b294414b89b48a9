"""The system check on a machine without CUDA: versions, memory and the launcher's build needs, no GPU parts;
the same text from the node and the console script; a failed self-check shows its cause on a (faked) GPU."""
import subprocess
import sys
from pathlib import Path

import tomllib
import torch
from glm_image_nodes.core.cuda import self_check
from glm_image_nodes.core.stages import system_check
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_report_has_the_machine_and_no_gpu_parts():
    info = system_check.report("cpu")
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert 0 < info["ram_free_gib"] <= info["ram_total_gib"]
    assert isinstance(info["python_h"], bool) and "sage_installed" in info and "flash_installed" in info
    for gpu_key in ("gpu", "capability", "vram_free_gib", "fused_ops", "fp8_gemm", "sdpa_dit", "driver"):
        assert gpu_key not in info
    text = system_check.format_report(info)
    assert f"torch: {torch.__version__}" in text and "RAM free (GiB)" in text
    assert "No CUDA device" in text


def test_node_and_console_script_print_the_report(capsys):
    node = NODE_CLASS_MAPPINGS["GLMImageSystemCheck"]
    assert NODE_DISPLAY_NAME_MAPPINGS["GLMImageSystemCheck"] == "GLM-Image System Check"
    assert node.INPUT_TYPES() == {"required": {}} and node.OUTPUT_NODE
    out = node().check()
    text, = out["result"]
    assert out["ui"]["text"] == [text] and text.startswith("GLM-Image system check")
    assert system_check.main(["--device", "cpu"]) == 0
    assert f"torch: {torch.__version__}" in capsys.readouterr().out
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["glm-image-check"].split(":")
    assert module == "glm_image_nodes.core.stages.system_check" and function == "main"
    assert "GLM-Image System Check" in (ROOT / "README.md").read_text()


def fake_cuda(monkeypatch, name, capability, *, bf16, triton, fp8_gemm):
    """CUDA device 0 faked for the report: 3 of 24 GiB free, SDPA runs flash, efficient, math."""
    monkeypatch.setattr(system_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(system_check.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(system_check.torch.cuda, "mem_get_info", lambda d: (3 * 2 ** 30, 24 * 2 ** 30))
    monkeypatch.setattr(system_check.torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(system_check.torch.cuda, "get_device_name", lambda d: name)
    monkeypatch.setattr(system_check.torch.cuda, "get_device_capability", lambda d: capability)
    monkeypatch.setattr(system_check.fp8, "has_fp8_matmul", lambda d: fp8_gemm)
    monkeypatch.setattr(system_check, "HAVE_TRITON", triton)
    monkeypatch.setattr(system_check, "_sdpa_choice", lambda device, dtype, shape: ["flash", "efficient", "math"])


def test_gpu_report_names_failed_ops_and_causes(monkeypatch):
    """CUDA faked: the report runs the checks on the device and prints each op's verdict and cause."""
    cpu = torch.device("cpu")
    fake_cuda(monkeypatch, "Fake RTX 3090", (8, 6), bf16=False, triton=True, fp8_gemm=False)
    seen = []

    def check_all(device, dtype, ops):
        seen.append((device, dtype))
        return [self_check.Verdict(op, str(device), "float32", op != "rms_norm",
                                   "RuntimeError: Python.h: No such file or directory" if op == "rms_norm" else "")
                for op in ops]

    monkeypatch.setattr(system_check.self_check, "check_all", check_all)
    info = system_check.report(None)
    assert seen == [(torch.device("cuda", 0), torch.float32)] and cpu.type == "cpu"
    assert info["fused_ops"]["rms_norm"].endswith("No such file or directory")
    assert info["fused_ops"]["silu_mul"] == "passed" and "scaled_mm" not in info["fused_ops"]
    assert info["cudnn_first_by_torch"] is False and info["vram_free_gib"] == 3.0
    text = system_check.format_report(info)
    assert "  rms_norm: RuntimeError: Python.h" in text and "GPU: Fake RTX 3090" in text
    assert "SDPA kernels for the DiT (torch's pick first): flash, efficient, math" in text
    assert "No CUDA device" not in text


def test_the_fp8_gemm_line_gives_this_devices_cause(monkeypatch):
    """With verdicts of another GPU recorded first, the FP8 GEMM line names the checked device's cause."""
    fake_cuda(monkeypatch, "Fake L40S", (8, 9), bf16=True, triton=False, fp8_gemm=True)
    monkeypatch.setattr(system_check.self_check, "passed", lambda op, device, dtype: False)
    monkeypatch.setattr(system_check.self_check, "verdicts", lambda: [
        self_check.Verdict("scaled_mm", "cuda:1", "bfloat16", False, "cuda:1's cause"),
        self_check.Verdict("scaled_mm", "cuda:0", "float32", False, "float32's cause"),
        self_check.Verdict("scaled_mm", "cuda:0", "bfloat16", False, "cuda:0's cause")])
    assert system_check.report(None)["fp8_gemm"] == "cuda:0's cause"


def test_console_script_runs_as_a_module():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import conftest; "
                          "from glm_image_nodes.core.stages.system_check import main; main(['--device', 'cpu'])"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "GLM-Image system check" in out.stdout


def test_bad_arguments_get_one_line_before_any_check(tmp_path, capsys):
    for args, says in ((["--device", "bogus"], "is not a torch device"),
                       (["--json", str(tmp_path / "missing" / "x.json")], "its folder does not exist")):
        try:
            system_check.main(args)
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"{args} was accepted")
        out, err = capsys.readouterr()
        assert says in err and "Traceback" not in err and out == ""  # refused before the report
