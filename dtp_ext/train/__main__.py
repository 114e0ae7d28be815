"""`python -m dtp_ext.train [options]` is `dtp-ext train [options]`."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
