import sys

from ds_train.lean_imports import collect_garbage_rarely

collect_garbage_rarely()  # before the CLI's own imports too
from ds_train.cli import main  # noqa: E402

sys.exit(main())
