import sys

from detfleet.cli import main

sys.exit(main())
