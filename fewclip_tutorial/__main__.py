"""``python -m fewclip_tutorial`` runs the ``fewclip`` command line."""

import sys

from fewclip_tutorial.cli import main

if __name__ == "__main__":
    sys.exit(main())
