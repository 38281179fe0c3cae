import sys

from bench.controlplane.run import main

sys.exit(main())
