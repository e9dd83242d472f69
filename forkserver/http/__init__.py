"""HTTP/1.1 protocol core: bytes in, events out; response heads out.

Nothing in this package touches sockets, processes or configuration objects;
a test enforces it (tests/unit/test_layering.py).
"""
