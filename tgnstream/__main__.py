"""``python -m tgnstream``: the ``tgnstream`` command."""

import sys

from tgnstream.apps.cli import main

sys.exit(main())
