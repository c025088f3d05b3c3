import sys

from qspec.cli import main

sys.exit(main())
