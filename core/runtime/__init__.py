"""Basic runtime every floor above uses: the attention entry point and SDPA kernel choice, the run options
passed with each call, input checks, size rules, pixel formats and the compute device."""
