"""`python -m fop_train`: the same as the `fop-train` command."""

import sys

from fop_train.cli import main

sys.exit(main())
