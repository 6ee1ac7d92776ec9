"""``python -m igconda.data.phantoms --config YAML --output DIR``."""

import sys

from igconda.data.phantoms.writing import main

sys.exit(main())
