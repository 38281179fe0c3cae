import sys

from bench.stream_upstream.run import main

sys.exit(main())
