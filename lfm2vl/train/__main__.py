"""`python -m lfm2vl.train ...`: the training command without the `lfm2vl` CLI (torchrun uses it)."""

import sys

from .command import cli

sys.exit(cli())
