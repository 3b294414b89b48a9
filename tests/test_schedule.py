"""Flow-matching schedules vs diffusers 0.42.1 (pipeline timestep code + FlowMatchEulerDiscreteScheduler)."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps  # noqa: E402
from glm_image_nodes.core.formats.reading import CheckpointError  # noqa: E402
from glm_image_nodes.core.stages.flow_schedule import (  # noqa: E402
    ShiftSettings,
    cogview4_schedule,
    glm_image_schedule,
    read_shift_settings,
)

# copies of the release configs (../shared/reference) kept in the repo
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "configs")
GLM_SCHEDULER = os.path.join(CONFIGS, "full", "scheduler")
COGVIEW4_SCHEDULER = os.path.join(CONFIGS, "cogview4_6b", "scheduler")
SIZES = [(64, 96), (512, 512), (1024, 1024), (1024, 1152), (1152, 768), (2048, 2048)]


def reference(folder, steps, height, width, glm):
    """The timestep block of GlmImagePipeline / CogView4Pipeline.__call__ (identical apart from the linspace)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    seq = ((height // 8) * (width // 8)) // 4
    t = np.linspace(1000, 1.0, steps + 1)[:-1] if glm else np.linspace(1000, 1.0, steps)
    t = t.astype(np.int64).astype(np.float32)
    mu = calculate_shift(seq, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("base_shift", 0.25), scheduler.config.get("max_shift", 0.75))
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", t, t / 1000, mu=mu)
    fed = timesteps - 1 if glm else timesteps  # what the pipelines pass to the transformer
    return fed, scheduler.sigmas


@pytest.mark.parametrize("steps", [1, 3, 4, 30, 50, 97])
@pytest.mark.parametrize("height,width", SIZES)
def test_glm_image_matches_diffusers(steps, height, width):
    fed, sigmas = reference(GLM_SCHEDULER, steps, height, width, glm=True)
    s = glm_image_schedule(steps, height, width, read_shift_settings(GLM_SCHEDULER))
    assert len(s) == steps
    assert torch.equal(s.model_timesteps, fed)
    assert torch.equal(s.sigmas, sigmas)


@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("height,width", SIZES)
def test_cogview4_matches_diffusers(steps, height, width):
    fed, sigmas = reference(COGVIEW4_SCHEDULER, steps, height, width, glm=False)
    s = cogview4_schedule(steps, height, width, read_shift_settings(COGVIEW4_SCHEDULER))
    assert torch.equal(s.model_timesteps, fed)
    assert torch.equal(s.sigmas, sigmas)


def test_known_values():
    s = glm_image_schedule(50, 1024, 1024)
    assert s.model_timesteps[:3].tolist() == [999.0, 979.0, 959.0] and s.model_timesteps[-1] == 19.0
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0 and len(s.sigmas) == 51
    c = cogview4_schedule(50, 1024, 1024)
    assert c.model_timesteps[0] == 1000.0 and c.model_timesteps[-1] == 1.0


def test_fed_timesteps_are_unshifted():
    # diffusers 0.40/0.41 feed sigmas * 1000 (shifted); the right conditioning is the raw linspace
    for height, width in [(512, 512), (1024, 1024)]:
        s = glm_image_schedule(50, height, width)
        shifted = s.sigmas[:-1] * 1000
        raw = torch.tensor(np.linspace(1000, 1.0, 51)[:-1].astype(np.int64), dtype=torch.float32)
        assert torch.equal(s.model_timesteps, raw - 1)
        assert (s.model_timesteps - shifted).abs().max() > 100


def test_settings_from_release(tmp_path):
    root = tmp_path / "release"
    (root / "scheduler").mkdir(parents=True)
    config = json.load(open(os.path.join(GLM_SCHEDULER, "scheduler_config.json")))
    config.update(max_shift=1.15, base_shift=0.5)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    settings = read_shift_settings(str(root))
    assert settings == ShiftSettings(base_shift=0.5, max_shift=1.15)
    assert settings == read_shift_settings(str(root / "scheduler"))
    _, sigmas = reference(str(root / "scheduler"), 4, 1024, 1024, glm=True)
    assert torch.equal(glm_image_schedule(4, 1024, 1024, settings).sigmas, sigmas)
    assert not torch.equal(glm_image_schedule(4, 1024, 1024).sigmas, sigmas)
    config["use_dynamic_shifting"] = False
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_dynamic_shifting"):
        read_shift_settings(str(root))


def test_starting_at():
    s = glm_image_schedule(10, 1024, 1024)
    assert torch.equal(s.starting_at(1.0).sigmas, s.sigmas) and len(s.starting_at(1.0)) == 10
    tail = s.starting_at(0.6)
    first = int((s.sigmas > 0.6).sum())
    assert first > 0 and len(tail) == 10 - first
    assert tail.sigmas[0] <= 0.6 < s.sigmas[first - 1]
    assert torch.equal(tail.model_timesteps, s.model_timesteps[first:])
    assert torch.equal(tail.sigmas, s.sigmas[first:])
    empty = s.starting_at(0.0)
    assert len(empty) == 0 and empty.sigmas.tolist() == [0.0]
