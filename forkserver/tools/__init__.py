"""Operator tools run beside a server (``forkserver stats``, ``forkserver top``), not inside it."""
