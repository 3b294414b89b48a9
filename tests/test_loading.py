"""Checkpoint reading: clear errors that name the file, the key and what to do."""
import json

import pytest
import torch
from glm_image_nodes.core.formats.checkpoint import open_checkpoint
from glm_image_nodes.core.formats.reading import CheckpointError, component_path, meta_device, resolve_dtype
from glm_image_nodes.core.host import memory
from glm_image_nodes.core.loading.components import check_state
from glm_image_nodes.core.runtime import devices
from safetensors.torch import save_file


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors cannot be read as safetensors.*download it again"):
        open_checkpoint(str(tmp_path))


def test_sharded_folder_reads_through_the_index(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3, 4)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = open_checkpoint(str(tmp_path))
    assert dict(checkpoint.shapes) == {"a": (2,), "b": (3, 4)}
    assert list(checkpoint.load({"b": "b"})) == ["b"]
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    # a missing shard is only an error for a loader that wants its keys (see load_component)
    assert open_checkpoint(str(tmp_path)).unavailable == {"b": "model-00002-of-00002.safetensors"}


def test_release_root_without_the_component(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no vae/ component"):
        component_path(str(tmp_path), "vae")


def test_check_state_names_missing_and_mismatched_tensors():
    with meta_device():
        module = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): bias"):
        check_state(module, {"weight": (3, 4)}, "x.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): scale"):
        check_state(module, {"weight": (3, 4), "bias": (3,), "scale": ()}, "x.safetensors")
    with pytest.raises(CheckpointError, match="tensor weight has shape \\(4, 4\\) but the config expects \\(3, 4\\)"):
        check_state(module, {"weight": (4, 4), "bias": (3,)}, "x.safetensors")


def test_dtype_choices():
    assert resolve_dtype("auto", "cpu", component="X") == torch.float32
    assert resolve_dtype("bf16", "cpu", component="X") == torch.bfloat16
    with pytest.raises(CheckpointError, match="X cannot run in fp16: it overflows. Choose bf16 or fp32."):
        resolve_dtype("fp16", "cpu", component="X", fp16_reason="it overflows.")


def test_on_compute_device_returns_models_to_the_offload_device():
    module = torch.nn.Linear(2, 2)
    with memory.on_compute_device(module) as device:
        assert module.weight.device.type == torch.device(device).type
    assert module.weight.device == devices.offload_device()


def test_out_of_memory_names_the_stage_and_what_to_lower():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(memory.OutOfMemory, match="in decoder sampling: lower the output size"):
        with memory.on_compute_device(module, stage="decoder sampling", advice="lower the output size"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert module.weight.device == devices.offload_device()
    assert module(torch.ones(1, 2)).shape == (1, 2)  # still usable


def test_out_of_memory_while_moving_weights_says_so(monkeypatch):
    from glm_image_nodes.core.loading import residency

    module = torch.nn.Linear(4, 4)
    before = module.weight.data_ptr()

    def no_room(tensors, device):  # stands in for a GPU without room for the weights
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(residency, "_point_to", no_room)
    with pytest.raises(memory.OutOfMemory, match=r"moving the weights of AR token sampling \(0\.0 GB\)"):
        with memory.on_compute_device(module, stage="AR token sampling"):
            pass
    assert module.weight.data_ptr() == before and module(torch.ones(1, 4)).shape == (1, 4)
    assert isinstance(memory.OutOfMemory("x"), torch.OutOfMemoryError)


def test_block_swap_streams_each_swapped_block_and_leaves_no_hooks(monkeypatch):
    """On a CPU-only machine nothing moves, so the test records what the swap asks to move and when."""
    from glm_image_nodes.core.loading import residency

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    calls, real = [], residency._point_to

    def record(tensors, device):
        calls.append(len(tensors))
        return real(tensors, device)

    monkeypatch.setattr(residency, "_point_to", record)
    x = torch.ones(1, 4)
    want = model(x)
    blocks = residency.resolve_blocks(torch.nn.Sequential(model), "0", 2)
    attributes = {name: set(m.__dict__) for name, m in model.named_modules()}
    with residency.resident(model, torch.device("cpu"), blocks) as device:
        assert device == torch.device("cpu")  # the compute device is yielded, for the caller to pass down
        assert {name: set(m.__dict__) for name, m in model.named_modules()} == attributes
        assert calls == [2]          # the unswapped block's weight and bias, up front
        assert torch.equal(model(x), want)
        assert calls == [2, 2, 2]    # each swapped block brought in just before it ran
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert "execution_device" not in model.__dict__
    with pytest.raises(ValueError, match="5 blocks requested but Sequential has 3; choose at most 3"):
        residency.resolve_blocks(torch.nn.Sequential(model), "0", 5)
    with pytest.raises(ValueError, match="has no transformer blocks to swap"):
        residency.resolve_blocks(model, None, 1)
