"""GLM-Image node details that need no model: output size from references, widget limits."""
import pytest
from glm_image_nodes.core.types import ReferenceImages
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
