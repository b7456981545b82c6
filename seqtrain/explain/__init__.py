"""`seqtrain explain`: which tokens drove a prediction, and a way to check that they did.

attribution scores each token by occlusion or integrated gradients (its docstring says how, and
why); output writes the scores as JSON records, HTML or coloured text; command is `seqtrain
explain` itself; faithfulness measures the scores with the deletion test (`deletion_drops`, AOPC:
remove the k highest-scored tokens and see how far the explained probability falls), which
`python -m bench.explain` writes into BENCHMARKS.md, and gives `eval --report` its top words.
"""

from __future__ import annotations

from seqtrain.explain.attribution import (
    IG_TOKENS,
    METHODS,
    OCCLUSION_MODE,
    OCCLUSION_ROWS,
    Encoded,
    ExplainError,
    Explanation,
    encode_with_offsets,
    explain_stream,
    explain_texts,
    integrated_gradients,
    kept_positions,
    occlusion,
)
from seqtrain.explain.command import explain_command
from seqtrain.explain.faithfulness import deletion_drops, spearman, top_words
from seqtrain.explain.output import FORMATS, HTML_HEAD, headline, html_block, to_record, write_explanations

__all__ = [
    "FORMATS",
    "HTML_HEAD",
    "IG_TOKENS",
    "METHODS",
    "OCCLUSION_MODE",
    "OCCLUSION_ROWS",
    "Encoded",
    "ExplainError",
    "Explanation",
    "deletion_drops",
    "encode_with_offsets",
    "explain_command",
    "explain_stream",
    "explain_texts",
    "headline",
    "html_block",
    "integrated_gradients",
    "kept_positions",
    "occlusion",
    "spearman",
    "to_record",
    "top_words",
    "write_explanations",
]
