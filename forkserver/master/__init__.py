"""The master side: supervises the workers and never speaks HTTP.

It forks, watches, reaps and replaces workers, handles signals and upgrades,
and gathers stats; what it shares with the workers lives one level up.
"""
