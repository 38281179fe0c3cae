import sys

from bench.replicas.run import main

sys.exit(main())
