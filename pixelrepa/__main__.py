"""`python -m pixelrepa COMMAND ...`: the `pixelrepa` command."""

import sys

from pixelrepa.cli.main import main

sys.exit(main())
