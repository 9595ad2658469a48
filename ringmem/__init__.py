"""ringmem: exact distributed long-context attention over a sequence-parallel ring."""
from .api import SCHEDULES, ring_attention
from .backends import BACKENDS
from .comm import CommStats
from .layouts import LAYOUTS
from .plan import INTERCONNECTS, Interconnect, Plan, plan
from .sharding import shard, unshard

__version__ = "0.1.0"
__all__ = ["ring_attention", "shard", "unshard", "plan", "Plan", "Interconnect",
           "INTERCONNECTS", "CommStats", "LAYOUTS", "SCHEDULES", "BACKENDS", "__version__"]
