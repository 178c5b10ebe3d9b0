"""drainbus: a cache-invalidation bus over SSH and Redis streams.

The public surface is the command line (``drainbus --help``) and the SSH commands
(``ssh bus help``). For embedding, :func:`load_settings` builds the one settings object and
:func:`open_bus` connects a node to Redis (a :class:`Bus`).
"""

from drainbus.bus import Bus, open_bus
from drainbus.config import Settings, load_settings
from drainbus.errors import DrainbusError

__all__ = ["Bus", "DrainbusError", "Settings", "load_settings", "open_bus"]
