"""``python -m dynaudit.schemas [DIR]``: regenerate the shipped JSON Schemas."""

import sys

from dynaudit.schemas.generate import main

sys.exit(main())
