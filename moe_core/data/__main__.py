"""`python -m moe_core.data`."""
import sys

from . import main

sys.exit(main())
