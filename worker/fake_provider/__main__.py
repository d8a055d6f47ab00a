"""`python -m worker.fake_provider` runs the fake provider on its own."""

import sys

from .command import main

sys.exit(main())
