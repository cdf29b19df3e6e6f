"""``python -m fedmount`` is the ``fedmount`` command."""

import sys

from fedmount.cli import main

sys.exit(main())
