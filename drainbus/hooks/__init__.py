"""Publishing from outside the bus: ``drainbus pub`` and the ``drainbus hook …`` commands.

:mod:`~drainbus.hooks.client` is the SSH publisher they share (:class:`BusClient`);
:mod:`~drainbus.hooks.watch` follows a folder of sites with inotify, debounces per site key
and spools what the bus has not yet stored (:mod:`~drainbus.hooks.spool`);
:mod:`~drainbus.hooks.git` is the ``post-receive`` hook; :mod:`~drainbus.hooks.commands` the
command line; :mod:`~drainbus.hooks.settings` the ``[hooks]`` config section. Nothing is
imported here, so :mod:`drainbus.config` can import the settings without a cycle.
"""
