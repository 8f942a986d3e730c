import sys

from cityops.cli import main

sys.exit(main())
