"""``python -m spach ...`` (also ``torchrun -m spach train ...``)."""
import sys

from .cli import main

sys.exit(main())
