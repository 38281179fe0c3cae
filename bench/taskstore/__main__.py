import sys

from bench.taskstore.run import main

sys.exit(main())
