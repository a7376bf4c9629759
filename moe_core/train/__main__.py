"""`python -m moe_core.train`."""
import sys

from . import main

sys.exit(main())
