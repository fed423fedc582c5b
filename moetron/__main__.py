import sys

from moetron.cli import main

sys.exit(main())
