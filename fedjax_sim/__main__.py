"""`python -m fedjax_sim ...` is the same as the `fedjax-sim` command."""

import sys

from fedjax_sim.cli.main import main

sys.exit(main())
