"""An app module whose import kills the importing process outright (no exception, no notice)."""

import os

os._exit(7)
