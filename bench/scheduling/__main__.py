import sys

from bench.scheduling.run import main

sys.exit(main())
