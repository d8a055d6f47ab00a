"""`python -m worker` runs the promptq command."""

import sys

from worker.cli.main import main

sys.exit(main())
