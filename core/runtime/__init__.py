"""Basic runtime every floor above uses: the attention entry point, input checks, size rules, pixel formats and
the compute device."""
