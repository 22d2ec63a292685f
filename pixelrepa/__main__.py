"""`python -m pixelrepa COMMAND ...`: the `pixelrepa` command (the entry point sits above the CLI,
so it is the one module outside `pixelrepa/cli/` that imports it)."""

import sys

import pixelrepa.cli.main as cli

sys.exit(cli.main())
