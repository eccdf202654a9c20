import sys

from falconet.cli import main

sys.exit(main())
