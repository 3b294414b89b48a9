"""How a model gets from its files into memory and onto the device: the one loading recipe (``ComponentSpec``,
``load_component``), where weights live while a stage runs (stage swap, block swap) and LoRA patches."""
