"""drainbus: a cache-invalidation bus over SSH and Redis streams.

The public surface is the command line (``drainbus --help``) and the SSH commands
(``ssh bus help``). For embedding, :func:`load_settings` builds the one settings object and
:class:`Bus` connects a node to Redis.
"""

from drainbus.bus import Bus
from drainbus.config import Settings, load_settings
from drainbus.errors import DrainbusError

__all__ = ["Bus", "DrainbusError", "Settings", "load_settings"]
