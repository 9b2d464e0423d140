"""AB-LoRA importance scorers. Each scorer is a function

    scorer(model, layers, adapter, scoring, ranks, progress=..., config=..., n_prune=..., grown=...) -> {rank: score}

where a higher score means a more important rank; the allocator prunes the ``n_prune`` lowest. ``grown``
holds the ranks grown by earlier rounds (None when not known), which a scorer may treat with more care. ``SCORERS``
maps the names accepted by ``ALoRAConfig.scorer`` to them.
"""

from .common import IGNORE_INDEX, NO_SCORING_DATA, ScoringSet, eval_mode, scoring_loss, trained_token_count
from .exact import GateEditor, distributed_exact_scores, exact_scores
from .fast import fast_scores, taylor_terms

SCORERS = {"fast": fast_scores, "exact": distributed_exact_scores}

__all__ = ["IGNORE_INDEX", "NO_SCORING_DATA", "SCORERS", "GateEditor", "ScoringSet", "distributed_exact_scores",
           "eval_mode", "exact_scores", "fast_scores", "taylor_terms", "scoring_loss", "trained_token_count"]
