import sys

from mu.cli import main

sys.exit(main())
