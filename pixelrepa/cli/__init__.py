"""The `pixelrepa` command line: one module per command."""
