"""The settings objects: each rule checked once where the object is built, and every widget of the nodes that
check settings maps to a field (or to an input a ``Check`` names), so renaming one fails here, not silently."""
import dataclasses
import inspect

import pytest
from glm_image_nodes.core.runtime.options import RunOptions
from glm_image_nodes.core.stages.settings import ARSampling, DecoderRun, from_widgets
from glm_image_nodes.nodes import NODE_CLASS_MAPPINGS as NODES
from glm_image_nodes.nodes.common import Check
from glm_image_nodes.nodes.sampler_node import SamplerNode

WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def widgets(cls) -> set[str]:
    types = cls.INPUT_TYPES()
    specs = {**types.get("required", {}), **types.get("optional", {})}
    return {name for name, spec in specs.items() if isinstance(spec[0], list) or spec[0] in WIDGET_KINDS}


def inputs(cls) -> set[str]:
    types = cls.INPUT_TYPES()
    return {*types.get("required", {}), *types.get("optional", {})}


def covered(cls) -> set[str]:
    """The inputs the node's CHECKS read: settings fields and the names of its Check rules."""
    names = set()
    for check in cls.CHECKS:
        names |= set(check.names) if isinstance(check, Check) else {f.name for f in dataclasses.fields(check)}
    return names


SAMPLERS = {name: cls for name, cls in NODES.items() if issubclass(cls, SamplerNode)}
CHECKED = {name: cls for name, cls in NODES.items() if getattr(cls, "CHECKS", ())}
# widgets a sampler reads itself through a Check rule, not through a settings object: the text, size and batch
# of what to make (CogView4 expands its conditioning to num_images)
OWN_WIDGETS = {"GLMImageARSampler": {"prompt", "width", "height"},
               "GLMImageCogView4Sampler": {"width", "height", "num_images"}}


def test_the_samplers_use_the_base():
    assert set(SAMPLERS) == {"GLMImageARSampler", "GLMImageDecoderSampler", "GLMImageCogView4Sampler"}


def unmapped_widgets(name: str, cls) -> set[str]:
    settings_fields = {f.name for check in cls.CHECKS if not isinstance(check, Check)
                       for f in dataclasses.fields(check)}
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    return widgets(cls) - settings_fields - run_fields - OWN_WIDGETS.get(name, set())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_widget_is_a_settings_field(name):
    cls = SAMPLERS[name]
    unmapped = unmapped_widgets(name, cls)
    assert not unmapped, f"{name}: widgets {sorted(unmapped)} map to no field of {cls.CHECKS} or RunOptions"
    # and what the node checks itself is a rule the node lists
    assert OWN_WIDGETS.get(name, set()) <= covered(cls)


@pytest.mark.parametrize("name", sorted(CHECKED))
def test_every_check_reads_inputs_the_node_has_and_the_core_takes(name):
    cls = CHECKED[name]
    for check in cls.CHECKS:
        if isinstance(check, Check):
            assert set(check.names) <= inputs(cls), (name, check)
            inspect.signature(check.function).bind(**{n: None for n in check.names})  # the core's names
        else:
            assert {f.name for f in dataclasses.fields(check)} & widgets(cls), (name, check)
    # every VALIDATE_INPUTS argument is read by some check (or is a widget whose range ComfyUI skips)
    validated = set(inspect.signature(cls.VALIDATE_INPUTS).parameters)
    assert validated <= covered(cls) | widgets(cls), name


def test_a_renamed_field_is_caught():
    renamed = dataclasses.make_dataclass("Renamed", [("num_steps", int, 50), ("guidance", float, 1.5),
                                                     ("seed", int, 0)], frozen=True)

    class Broken(SAMPLERS["GLMImageDecoderSampler"]):
        CHECKS = (renamed,)

    assert unmapped_widgets("GLMImageDecoderSampler", Broken) == {"steps", "step_cache"}


def test_settings_are_checked_once_with_the_messages_of_the_checks():
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ARSampling(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"top_p = 0 is out of range: it must be in \(0, 1\]|top_p"):
        ARSampling(top_p=0.0)
    with pytest.raises(ValueError, match="num_images = 17"):
        ARSampling(num_images=17)
    with pytest.raises(ValueError, match="decode_steps must be one of eager, cuda graph, compiled"):
        ARSampling(decode_steps="fast")
    with pytest.raises(ValueError, match="steps = 201"):
        DecoderRun(steps=201)
    with pytest.raises(ValueError, match="step_cache must be >= 0"):
        DecoderRun(step_cache=-0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecoderRun().steps = 3
    # a value linked in the workflow is None while ComfyUI validates: the default stands in until the run
    assert from_widgets(DecoderRun, {"steps": None, "guidance": 3.0, "other": 1}) == DecoderRun(guidance=3.0)
    assert DecoderRun(guidance=1.0).cfg is False and ARSampling(temperature=0).greedy


def test_validate_inputs_and_the_run_give_the_same_message():
    answer = NODES["GLMImageDecoderSampler"].VALIDATE_INPUTS(seed=0, steps=0, guidance=1.5)
    with pytest.raises(ValueError) as error:
        NODES["GLMImageDecoderSampler"]().sample(None, None, None, seed=0, steps=0, guidance=1.5)
    assert str(error.value) == answer
    assert "steps = 0 is out of range" in answer
