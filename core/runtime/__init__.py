"""Plumbing every stage uses: checkpoint reading, the attention entry point, the ComfyUI boundary, the handles
passed between nodes, size rules and pixel formats."""
