"""The ComfyUI boundary, split by job: model folders and names, memory and the ModelPatcher, progress and live
previews, interrupts. Everything here works without ComfyUI too, but ``comfy_patcher`` (imported only inside
ComfyUI); only the stages and nodes above import it."""
