"""`python -m moe_core.train` (and `torchrun -m moe_core.train`)."""
import sys

from .cli import main

sys.exit(main())
