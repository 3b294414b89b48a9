"""Captions and caption-score reranking with a GLM-V vision-language model, through transformers.

GLM-Image's own weights cannot caption (its LM head has only the vision vocabulary), so this uses a
GLM-V release (GLM-4.1V-9B-Thinking, GLM-4.6V-Flash) run by ``transformers`` (an optional
dependency, the pack's ``caption`` extra), imported lazily.

The caption score is CogView's CapS with a modern captioner: the prompt is teacher-forced as the
assistant's answer to "Describe this image." about the image, and the score is the mean
log-probability of the prompt's tokens (the log of CapS' per-token geometric mean).

Inputs are built the way ``Glm4vProcessor`` builds them (chat template, then each image
placeholder repeated once per merged patch, and ``mm_token_type_ids`` marking those), but from the
tokenizer and image processor alone: the processor class also needs torchvision's video
processor, which a captioner has no use for.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..formats.reading import CheckpointError, read_config, safetensors_files
from ..loading.placement import place
from ..runtime import checks
from ..runtime.devices import compute_device

SUPPORTED_MODEL_TYPES = ("glm4v", "glm46v")  # glm46v: Glm46VForConditionalGeneration, a renamed Glm4v
SUPPORTED_MODELS = "GLM-4.1V-9B-Thinking, GLM-4.1V-9B-Base or GLM-4.6V-Flash (config model_type glm4v or glm46v)"
INSTALL_HINT = "pip install 'transformers>=5' (the pack's caption extra: pip install 'glm-image-nodes[caption]')"

PRESETS = {
    "short caption": "Describe this image in one short sentence.",
    "detailed caption": (
        "Describe this image in detail: the main subjects, their appearance and actions, the setting, "
        "the composition, the lighting, the colors and the style, and any visible text."),
    "GLM-Image prompt": (
        "Write a prompt for a text-to-image model that recreates this image. In one detailed paragraph, "
        "describe the subjects, the setting, the composition, the lighting, the colors and the style. "
        "Put every piece of text that should be rendered in the image in double quotes, exactly as written. "
        "Reply with the prompt only."),
}
CAPS_INSTRUCTION = "Describe this image."

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
ANSWER_MARKERS = re.compile(r"</?answer>|<\|begin_of_box\|>|<\|end_of_box\|>|<\|[a-z_]+\|>|\[gMASK\]|<sop>|<eop>")


@dataclass
class Captioner:
    model: Any              # Glm4vForConditionalGeneration (or the identical Glm46V class)
    tokenizer: Any
    image_processor: Any    # Glm4vImageProcessor (torchvision) or Glm4vImageProcessorPil
    chat_template: str
    image_token: str        # "<|image|>"
    image_token_id: int
    source: str

    @property
    def device(self) -> torch.device:
        # where the (first) weights are; a stage computes on the device its caller passes (partial loads)
        return self.model.device


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"Captioning with GLM-V needs transformers 5 or newer: {INSTALL_HINT}.") from e
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"Captioning with GLM-V needs transformers 5 or newer (found {transformers.__version__}): "
                          f"{INSTALL_HINT}.")
    return transformers


def _check_release_folder(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder. Point the captioner loader at the whole release folder of "
                              f"{SUPPORTED_MODELS} (config.json, *.safetensors, tokenizer and processor files).")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json, so it is not a GLM-V release. The captioner needs "
                              f"{SUPPORTED_MODELS}.")
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path} holds model_type {model_type!r} (architectures {config.get('architectures')}), not a GLM-V "
            f"captioner. Supported: {SUPPORTED_MODELS}.")
    safetensors_files(path)
    for names, what in ((("tokenizer.json", "tokenizer_config.json"), "tokenizer"),
                        (("preprocessor_config.json",), "image processor")):
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise CheckpointError(f"{path} has no {what} file ({' or '.join(names)}). Download the whole release "
                                  f"folder, not just the weights.")
    return config


def _chat_template(path: str, tokenizer) -> str:
    if tokenizer.chat_template:
        return tokenizer.chat_template
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "processor_config.json"):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
            if template:
                return template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja, chat_template.json or one in "
                          f"tokenizer_config.json). Download the whole release folder.")


def load_captioner(path: str, dtype: str = "auto", device: torch.device | str | None = None, *,
                   compute_device: torch.device | str | None = None) -> Captioner:
    """Load a GLM-V release folder (model, tokenizer, image processor, chat template) for captioning onto
    ``device``, to compute on ``compute_device`` (default: ``device``; ``dtype`` auto suits it)."""
    config = _check_release_folder(path)
    transformers = _require_transformers()
    placement = place(dtype, device, compute_device, component="GLM-V captioner")
    if placement.fp8:  # place() takes the FP8 choice of the pack's own components; transformers' model has none
        raise CheckpointError(f"The GLM-V captioner has no {dtype} form: choose auto, bf16, fp32 or fp16.")
    device, torch_dtype = placement.weights, placement.dtype
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    template = _chat_template(path, tokenizer)
    # device_map loads straight onto the device but needs accelerate; without it, load on the CPU and move.
    placement = {"device_map": device} if importlib.util.find_spec("accelerate") else {}
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, **placement).to(device)
    image_token_id = int(config.get("image_token_id", model.config.image_token_id))
    return Captioner(model=model.eval(), tokenizer=tokenizer, image_processor=image_processor,
                     chat_template=template, image_token=tokenizer.convert_ids_to_tokens(image_token_id),
                     image_token_id=image_token_id, source=path)


def _to_pil(image: torch.Tensor):
    from PIL import Image

    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"expected one image [H, W, 3] with values in 0..1, got shape {tuple(image.shape)}")
    pixels = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels)


def chat_inputs(captioner: Captioner, image: torch.Tensor, instruction: str,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for one user turn (the image, then ``instruction``) and the assistant's turn opened,
    as ``Glm4vProcessor`` builds them, on ``device`` (the compute device; None: where the weights are).
    Templates that can switch thinking off (GLM-4.6V) get it off."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = captioner.tokenizer.apply_chat_template(messages, chat_template=captioner.chat_template, tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)
    pixels = captioner.image_processor(images=[_to_pil(image)], return_tensors="pt")
    merge = captioner.image_processor.merge_size
    n_tokens = int(pixels["image_grid_thw"][0].prod()) // merge ** 2
    if text.count(captioner.image_token) != 1:
        raise ValueError(f"the chat template of {captioner.source} did not place exactly one {captioner.image_token} "
                         f"for the image; it is not a GLM-V template.")
    text = text.replace(captioner.image_token, captioner.image_token * n_tokens)
    input_ids = torch.tensor([captioner.tokenizer(text, add_special_tokens=False)["input_ids"]])
    device = compute_device(device, captioner.device)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids, device=device),
        "mm_token_type_ids": (input_ids == captioner.image_token_id).int().to(device),
        "pixel_values": pixels["pixel_values"].to(device),
        "image_grid_thw": pixels["image_grid_thw"].to(device),
    }


def strip_reasoning(text: str) -> str:
    """The answer of a GLM-V reply: thinking blocks, answer/box markers and chat tokens removed."""
    text = THINK_BLOCK.sub("", text)
    if "</think>" in text:  # the template opened the think block itself
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        raise RuntimeError("The captioner was still thinking when it reached max_new_tokens; raise max_new_tokens.")
    return ANSWER_MARKERS.sub("", text).strip()


class _StepCriterion:
    """A generate() stopping criterion that never stops; it calls ``step`` once per new token (the driving stage's
    progress bar, which also raises on the user's interrupt)."""

    def __init__(self, step: Callable[[], None]):
        self.step = step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def check_caption_settings(max_new_tokens: int, temperature: float, seed: int) -> None:
    """The captioner's settings (the caption node's VALIDATE_INPUTS calls this too)."""
    checks.check_int(max_new_tokens, "max_new_tokens", 1, checks.MAX_NEW_TOKENS,
                     fix="Thinking models reason first: 1024 or more suits them.")
    checks.check_float(temperature, "temperature", 0.0, fix="Use 0 for greedy captions or a temperature above 0.")
    checks.check_seed(seed)


def check_rerank_prompt(prompt: str) -> str:
    checks.check_text(prompt, "prompt")
    if not prompt.strip():
        raise ValueError("prompt is empty: reranking scores how likely the prompt is given each image; give the "
                         "prompt the candidates were made from.")
    return prompt


def chat_text_inputs(captioner: Captioner, messages: list[dict],
                     device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for a text-only chat (``messages`` of role/content strings) with the assistant's turn
    opened, as ``Glm4vProcessor.apply_chat_template`` builds them, on ``device`` (the compute device; None: where
    the weights are). Thinking is switched off where the template can (GLM-4.6V)."""
    text = captioner.tokenizer.apply_chat_template(messages, chat_template=captioner.chat_template, tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)
    input_ids = torch.tensor([captioner.tokenizer(text, add_special_tokens=False)["input_ids"]])
    device = compute_device(device, captioner.device)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids, device=device),
            "mm_token_type_ids": torch.zeros_like(input_ids, dtype=torch.int, device=device)}


@torch.inference_mode()
def generate_reply_ids(captioner: Captioner, inputs: dict[str, torch.Tensor], max_new_tokens: int,
                       temperature: float = 0.0, seed: int = 0, step: Callable[[], None] | None = None) -> torch.Tensor:
    """The new token ids ``[n]`` of the model's reply to ``inputs``. ``temperature`` 0 decodes greedily
    (deterministic); above 0 it samples with ``seed``. ``step`` is called once per token (progress, interrupts)."""
    check_caption_settings(max_new_tokens, temperature, seed)
    transformers = _require_transformers()
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    device = inputs["input_ids"].device  # the compute device the inputs were built for
    criteria = [_StepCriterion(step)] if step is not None else []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = captioner.model.generate(
            **inputs, max_new_tokens=max_new_tokens, **sampling,
            stopping_criteria=transformers.StoppingCriteriaList(criteria))
    return out[0, inputs["input_ids"].shape[1]:]


def decode_reply(captioner: Captioner, new_tokens: torch.Tensor) -> str:
    """The answer in a reply's token ids: decoded, reasoning and chat markers removed."""
    return strip_reasoning(captioner.tokenizer.decode(new_tokens, skip_special_tokens=False))


@torch.inference_mode()
def caption_score(captioner: Captioner, image: torch.Tensor, prompt_ids: list[int],
                  device: torch.device | None = None) -> torch.Tensor:
    """Mean log p(prompt token | image, "Describe this image.", earlier prompt tokens), one image, computed on
    ``device`` (None: where the weights are)."""
    inputs = chat_inputs(captioner, image, CAPS_INSTRUCTION, device)
    answer = torch.tensor([prompt_ids], device=inputs["input_ids"].device)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], answer], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer, dtype=torch.int)], 1)
    # Only the logits that predict the prompt tokens: the position before each of them.
    logits = captioner.model(**inputs, use_cache=False, logits_to_keep=answer.shape[1] + 1).logits[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, answer[0, :, None])[:, 0].mean().cpu()
