"""The smallest WSGI app, importing nothing: what a server spends to start, without a framework's import.

    python3 scripts/bench.py --scenarios startup --startup-app hello_app:app
    python3 scripts/startup_profile.py --app hello_app:app --runs 11 --no-importtime
"""

HELLO = b"Hello, World!"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))])
    return [HELLO]
