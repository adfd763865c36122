"""``python -m napari_convlora`` (and ``torchrun ... -m napari_convlora train ...``): the command line."""

import sys

from .cli.main import console_main

if __name__ == "__main__":
    sys.exit(console_main())
