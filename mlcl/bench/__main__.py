import sys

from mlcl.bench import main

sys.exit(main())
