"""``python -m offload.cli``: the same as the ``offload`` command."""
import sys

from . import main

sys.exit(main())
