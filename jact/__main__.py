"""`python -m jact` is the `jact` command."""

import sys

from jact.cli import main

sys.exit(main())
