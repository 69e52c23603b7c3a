"""``python -m dntk`` (and ``torchrun ... -m dntk run ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
