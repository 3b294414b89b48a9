"""GLM-Image node details that need no model: output size from references, widget limits."""
import pytest
from glm_image_nodes.core.stages.handles import ReferenceImages
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.nodes.sampling.ar import output_size


def references(*sizes):
    return ReferenceImages(latents=[], prior_ids=[], token_ids=[], sizes=list(sizes))


def test_zero_size_means_the_first_reference():
    assert output_size(0, 0, references((768, 1344), (1024, 1024))) == (1344, 768)
    assert output_size(1024, 0, references((768, 1344))) == (1024, 768)
    assert output_size(1024, 512, None) == (1024, 512)
    with pytest.raises(ValueError, match="no references are connected"):
        output_size(0, 0, None)


@pytest.mark.parametrize("node,names", [("GLMImageARSampler", ("width", "height")),
                                        ("GLMImageImageToTokens", ("width", "height")),
                                        ("GLMImageCogView4Sampler", ("width", "height"))])
def test_size_widgets_stop_at_2048_in_steps_of_32(node, names):
    required = NODES[node].INPUT_TYPES()["required"]
    for name in names:
        options = required[name][1]
        assert options["max"] == 2048 and options["step"] == 32 and options["min"] % 32 == 0


@pytest.mark.parametrize("width,height,nearest", [(1000, 1024, "992x1024"), (256, 512, "512x512"),
                                                  (2048, 4096, "2048x2048"), (720, 1280, "704x1280")])
def test_ar_sampler_asks_for_a_valid_size_before_running(width, height, nearest):
    with pytest.raises(ValueError, match=f"sides of 512..2048 px in multiples of 32.*nearest valid size is {nearest}"):
        NODES["GLMImageARSampler"]().sample(None, "a cat", width, height, seed=0, temperature=0.9, top_p=0.75,
                                            top_k=16512, num_images=1)


def test_decoder_sampler_checks_steps_and_guidance():
    from glm_image_nodes.core.stages.settings import DecoderRun
    with pytest.raises(ValueError, match=r"steps = 0 is out of range: it must be 1\.\.200\. Use 1\.\.200 steps"):
        DecoderRun(steps=0, guidance=1.5, seed=0)
    with pytest.raises(ValueError, match="guidance = -1 is out of range: it must be at least 0"):
        DecoderRun(steps=50, guidance=-1.0, seed=0)
