"""Weight files and their layouts: finding and opening a component's files, scaled FP8 (ComfyUI's convention),
GGUF (city96 style), LoRA files.

Modules:
- ``reading``: a component's files and configs, ``CheckpointError``, the dtype choices;
- ``ggml``: the GGML block types in torch (dequantizers bit-identical to ``gguf``'s numpy ones; the K-quant
  quantizers gguf-py lacks), ``fp8``: e4m3fn with per-tensor or per-output-channel scales and ``_scaled_mm``;
- ``layers``: the pack's ``Linear`` / ``Embedding``, whose weight is plain, FP8 + scale or GGUF-packed;
- ``checkpoint``: one read-only, memory-mapped view over safetensors, scaled-FP8 and GGUF files;
- ``writers``: the FP8 and GGUF file writers (``convert.conversion`` drives them);
- ``lora_files`` and ``lora_targets``: LoRA files read and mapped onto the pack's modules.

Design note (per-layer weights, and where LoRA plugs in)
--------------------------------------------------------
Every ``nn.Linear`` and ``nn.Embedding`` of a component that has weight formats (the AR model, both DiTs,
Glyph-ByT5, CogView4's text encoder) becomes ``layers.Linear`` / ``layers.Embedding`` at load time
(``layers.adopt``; state-dict keys unchanged). Such a layer holds:

- ``weight``: a plain tensor in the compute dtype, a float8_e4m3fn tensor (with the buffer ``scale_weight``, shape
  ``()`` or ``[out, 1]``) or the raw GGUF bytes ``[rows, bytes_per_row]`` (uint8); ``weight_kind`` says which
  (``"plain"``, ``"fp8"``, ``"Q4_K"``, ...), ``weight_shape`` is the logical shape, ``compute_dtype`` the dtype it
  is turned into;
- ``compute_weight(device, dtype)``: the weight as the layer uses it this call, dequantized on ``device``.

**The patch hook.** ``layer.weight_patches`` is a list of callables ``patch(weight) -> weight``. Each call of the
layer dequantizes the weight to the compute dtype on the compute device, applies ComfyUI's own
``weight_function`` list first (its low-VRAM LoRA patches, which ComfyUI clears on reloads), then every entry of
``weight_patches`` in order, checks the shape is unchanged, and runs with the result. The stored (packed)
weight is never modified, so patches can be added, re-weighted or removed between runs at no cost and a
quantized model stays quantized. LoRAs use it (``loading.lora_patches``): one patch per patched layer, installed
only while a stage runs and removed after. While a layer has patches, FP8 layers skip ``_scaled_mm`` and take the
dequantize path (correct, a little slower); plain layers pay one weight-sized temporary per call.

Inside ComfyUI a model sits in a ``ModelPatcher`` (``host.memory.model_patcher``) whose model is a container with
the pack's module as ``net``, and LoRAs are ComfyUI's key-based patches on a clone of it
(``add_patches({"net.layers.0...weight": ...})``). ``host.comfy_patcher.PackModelPatcher`` leaves plain weights
to ComfyUI (a patched copy while loaded, the stored tensor kept as its backup) and turns the patches of a packed
weight into a ``weight_patches`` entry instead of patching the stored tensor, as ComfyUI-GGUF's patcher does. The
layers' ``weight_function`` gets a copy of a plain weight, since ComfyUI's low-VRAM patches work in place; and the
method that assigns a weight is ``assign_weight``, not ``set_weight``, which ComfyUI would take for its own hook.

Rules kept by the format code: nothing is dequantized for the whole model at once; only the layer that runs is
(the embedding only the rows looked up); loading never copies a weight that is already in the wanted dtype (the
file pages stay mapped); GGUF dequantization is bit-identical to ``gguf.quants.dequantize``.
"""
