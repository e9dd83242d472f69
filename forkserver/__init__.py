"""forkserver: a pre-fork WSGI server with a supervising master and strict HTTP/1.1."""

__version__ = "0.1.0"
