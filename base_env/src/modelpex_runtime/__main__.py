"""``python -m modelpex_runtime``: the entry point every model pex is built with."""

import sys

from modelpex_runtime.entry import main

sys.exit(main())
