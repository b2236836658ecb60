import sys

from vireid.cli import main

sys.exit(main())
