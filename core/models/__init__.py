"""The networks, one module each, with their config and checkpoint loader (``torch.nn`` only)."""
