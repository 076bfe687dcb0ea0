"""``python -m softprompt`` (and ``torchrun -m softprompt``): the ``softprompt`` command."""

import sys

from .cli import main

sys.exit(main())
