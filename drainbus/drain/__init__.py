"""The cache-drain consumer and its targets. It knows nothing of SSH.

:mod:`~drainbus.drain.build` opens the configured targets and builds the daemon
(:mod:`~drainbus.drain.daemon`); :mod:`~drainbus.drain.purges` is the purge grammar.
"""
