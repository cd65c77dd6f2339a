"""``python -m loradrop ...`` (also what ``torchrun -m loradrop train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
