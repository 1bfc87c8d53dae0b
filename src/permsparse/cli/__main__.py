"""``python -m permsparse.cli`` (what torchrun launches): the ``permsparse`` command."""

import sys

from permsparse.cli import main

sys.exit(main())
