"""python -m deltapack.cli: the deltapack command."""
import sys

from . import main

sys.exit(main())
