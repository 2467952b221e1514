"""``python -m alq_torch.train``: the same as ``alq-train``."""

import sys

from .cli import main

sys.exit(main())
