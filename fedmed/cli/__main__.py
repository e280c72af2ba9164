"""``python -m fedmed.cli``: the same as the ``fedmed`` command."""

import sys

from fedmed.cli import main

sys.exit(main())
