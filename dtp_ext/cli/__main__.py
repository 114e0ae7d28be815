"""`python -m dtp_ext.cli ...` is `dtp-ext ...`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
