"""``fastkd.etd``, the public path of ETD: ``from fastkd.etd import extract_student`` and ``python -m fastkd.etd``
(the code is fastkd.student.etd)."""

import sys

from fastkd.student.etd import *  # noqa: F403
from fastkd.student.etd import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
