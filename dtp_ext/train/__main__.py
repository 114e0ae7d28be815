"""`python -m dtp_ext.train [options]` is `dtp-ext train [options]`."""

import sys

from dtp_ext.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
