import sys

from mlcl.rehearse import main

sys.exit(main())
