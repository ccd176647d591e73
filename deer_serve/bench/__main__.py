import sys

from deer_serve.bench.cli import main

sys.exit(main())
