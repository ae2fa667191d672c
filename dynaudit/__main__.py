import sys

from dynaudit.cli import main

sys.exit(main())
