"""`python -m worker` runs the promptq command."""

import sys

from .cli import main

sys.exit(main())
