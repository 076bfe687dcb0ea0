"""``python -m softprompt.cli``: the ``softprompt`` command, as ``python -m softprompt``."""

import sys

from . import main

sys.exit(main())
