"""ringmem: exact distributed long-context attention over a sequence-parallel ring."""
from .api import SCHEDULES, ring_attention, shard, unshard
from .backends import BACKENDS
from .layouts import LAYOUTS

__version__ = "0.1.0"
__all__ = ["ring_attention", "shard", "unshard", "LAYOUTS", "SCHEDULES", "BACKENDS",
           "__version__"]
