"""An app whose import takes SLOW_BOOT_SECONDS, as a large project or a model being loaded can."""

import os
import time

time.sleep(float(os.environ.get("SLOW_BOOT_SECONDS", "0")))


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"booted\n"]
