import sys

from .commands.nanobragg import main

sys.exit(main())
