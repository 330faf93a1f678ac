import sys

from hpcdnn.cli import main

sys.exit(main())
