"""Long-context evaluation: RULER-style tasks generated locally (`tasks`) and their scoring
(`scoring`)."""
from .scoring import score
from .tasks import TASKS, Query, Sample, generate

__all__ = ["TASKS", "Query", "Sample", "generate", "score"]
