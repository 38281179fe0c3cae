import sys

from bench.tail.run import main

sys.exit(main())
