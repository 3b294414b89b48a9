"""The networks, one module each, with their config and checkpoint loader (``torch.nn`` only); progress and
interrupt checks are passed in by whoever drives them."""
