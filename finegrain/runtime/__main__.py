"""`python -m finegrain.runtime EXPORT_DIR PHOTO_OR_FOLDER... [-o preds.csv]`: see runner.py."""

import sys

from finegrain.runtime.runner import main

if __name__ == "__main__":
    sys.exit(main())
