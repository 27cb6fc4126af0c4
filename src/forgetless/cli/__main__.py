"""``python -m forgetless.cli``."""

import sys

from forgetless.cli import main

sys.exit(main())
