"""Plain-PyTorch models and machinery of the GLM-Image family; importable without ComfyUI."""
