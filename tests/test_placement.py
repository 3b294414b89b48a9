"""A loader's dtype choice is resolved once into a placement device, a compute device and a torch dtype:
``auto`` suits the device the component computes on, not the one its weights wait on."""
import pytest
import torch
from glm_image_nodes.core.formats.reading import CheckpointError
from glm_image_nodes.core.loading.placement import Placement, place
from glm_image_nodes.core.models.glm_image_dit import load_decoder
from glm_image_nodes.testing.tiny_release import write_tiny_release


def test_auto_suits_the_compute_device_and_the_weights_stay_where_they_are_placed():
    # xpu/mps take bf16 without any device present (resolve_dtype), so this runs on any CPU
    assert place("auto", "cpu", "xpu", component="X") == Placement(torch.device("cpu"), torch.device("xpu"),
                                                                    torch.bfloat16)
    assert place("auto", "cpu", component="X") == Placement(torch.device("cpu"), torch.device("cpu"), torch.float32)
    assert place("fp8_e4m3fn", "cpu", "mps", component="X") == Placement(torch.device("cpu"), torch.device("mps"),
                                                                          torch.bfloat16, fp8=True)
    assert place("fp32", "cpu", "xpu", component="X").dtype == torch.float32
    with pytest.raises(CheckpointError, match="X cannot run in fp16: it overflows"):
        place("fp16", "cpu", component="X", fp16_reason="it overflows.")


def test_a_loader_places_weights_on_one_device_in_the_dtype_of_the_other(tmp_path):
    release = write_tiny_release(str(tmp_path / "release"))
    dit = load_decoder(release, "auto", device="cpu", compute_device="xpu")
    weights = list(dit.parameters())
    assert all(w.device.type == "cpu" for w in weights)
    assert {w.dtype for w in weights} == {torch.bfloat16}   # auto for the xpu it will compute on
    assert {w.dtype for w in load_decoder(release, "auto", device="cpu").parameters()} == {torch.float32}
