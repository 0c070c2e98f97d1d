"""`queuechat-customer` and `python -m queuechat_customer`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
