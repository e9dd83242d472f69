"""The worker side: accepts connections and serves requests to the app.

I/O, PEP 3333, static files and TLS; the HTTP rules themselves are in
``forkserver.http``.
"""
