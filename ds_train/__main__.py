import sys

from ds_train.cli import main

sys.exit(main())
