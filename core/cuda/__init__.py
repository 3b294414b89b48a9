"""The pack's Triton kernels, each beside a plain-torch reference of the same function.

``dispatch`` is the one place that chooses between them: the fused ``torch.library`` custom ops (one Triton
launch each on CUDA, visible to ``torch.compile``) or the torch references (CPU, and wherever Triton is
missing). The model code calls the functions of ``dispatch`` only.
"""
