"""``python -m cl_hres`` (also what ``torchrun -m cl_hres`` runs)."""

import sys

from cl_hres.cli.app import main

sys.exit(main())
