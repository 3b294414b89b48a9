"""The base of the sampler nodes: the checks-then-device ritual written once.

Every sampler node checks its inputs into the settings objects its ``VALIDATE_INPUTS`` builds (``CHECKS``),
builds the ``RunOptions`` of the run from its widgets (attention, compile), and then runs the core with its
models on the compute device, reporting a failure there as its ``STAGE`` with its ``ADVICE``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.host import memory
from ..core.runtime.options import RunOptions
from ..core.stages.settings import from_widgets
from .common import answer, category, check_now


@dataclass(frozen=True)
class Checked:
    """What ``SamplerNode.checked`` built: the settings objects by class, and the run options."""
    settings: dict
    options: RunOptions

    def __getitem__(self, cls):
        return self.settings[cls]


class SamplerNode:
    CATEGORY = category("sampling")
    FUNCTION = "sample"
    CHECKS: tuple = ()     # settings dataclasses and ``common.Check`` rules, for VALIDATE_INPUTS and the run
    STAGE = "sampling"
    ADVICE = "lower the output size or the number of images"

    @classmethod
    def answer(cls, values: dict) -> bool | str:
        """What ``VALIDATE_INPUTS`` returns for ``values`` (its ``locals()``)."""
        return answer(cls, values, *cls.CHECKS)

    def checked(self, values: dict) -> Checked:
        """The node's inputs (its ``locals()``) checked: every setting object built once, and the RunOptions."""
        settings = check_now(values, *self.CHECKS)
        return Checked(settings, from_widgets(RunOptions, values))

    def on_device(self, *models, **placement):
        """The models on the compute device for the run (ComfyUI's memory manager inside ComfyUI); ``placement``:
        more of ``on_compute_device``'s options (``memory_required``). Yields that device, for the stage's
        ``device=``: under block swap or a partial load the weights cannot tell it."""
        return memory.on_compute_device(*models, stage=self.STAGE, advice=self.ADVICE, **placement)
