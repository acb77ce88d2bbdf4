"""finegrain: fine-grained image classification (birds first).

Self-supervised contrastive pretraining, supervised contrastive fine-tuning and evaluation of any
timm backbone, chained through stage artifacts.
"""

import os as _os

# albumentations checks PyPI for a newer release on import (2 s timeout). finegrain never
# needs the network at run time, so switch that check off before anything imports it.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
