"""``python deploy/local/services ...``: Python runs this file with the package's own folder on
``sys.path``, so the package is imported by name from its parent folder, as the tests import it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.cli import main

sys.exit(main())
