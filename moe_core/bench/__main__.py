"""`python -m moe_core.bench`."""
import sys

from .cli import main

sys.exit(main())
