"""Weight formats beside plain safetensors (FP8, GGUF): readers, per-layer dequantization, the converter."""
