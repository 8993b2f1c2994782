"""attnlab: the attention mechanisms of the long-context era behind one call.

    import attnlab
    out = attnlab.attention(q, k, v, method="sliding_window", causal=True, window=1024)
    op = attnlab.prepare("sliding_window", causal=True, window=1024)   # resolved once, called often
    out = op(q, k, v)
    with attnlab.use(model, prefill="vertical_slash", decode="page_topk"):   # a Hugging Face causal LM
        model.generate(...)

Layout (batch, heads, seq, head_dim); GQA when k/v have fewer heads; cross-attention when N_q != N_k.
Importing attnlab registers its methods in its own registry and does nothing else: no downloads, no
compilation, no environment writes, no patching of other libraries.
"""

from attnlab.api import Op, attention, explain, prepare, resolve
from attnlab.core import Capabilities, MethodSpec, Result, TensorInput
from attnlab.dispatch import Choice
from attnlab.errors import (
    AttnlabError,
    BackendError,
    DenseTooLargeError,
    InputError,
    ParamError,
    UnknownMethodError,
    UnsupportedPatternError,
)
from attnlab.patterns import Pattern
from attnlab.plans import Plan
from attnlab.registry import get, methods
from attnlab.settings import settings

# Register the built-in methods (into attnlab's own registry; nothing else happens at import).
import attnlab.catalog  # noqa: F401  # isort: skip
from attnlab import hf  # isort: skip  (transformers is imported only when a model is used)
from attnlab.hf import use  # isort: skip

__version__ = "0.1.0"

__all__ = [
    "AttnlabError",
    "BackendError",
    "Capabilities",
    "Choice",
    "DenseTooLargeError",
    "InputError",
    "MethodSpec",
    "Op",
    "ParamError",
    "Pattern",
    "Plan",
    "Result",
    "TensorInput",
    "UnknownMethodError",
    "UnsupportedPatternError",
    "__version__",
    "attention",
    "explain",
    "get",
    "hf",
    "methods",
    "prepare",
    "resolve",
    "settings",
    "use",
]
