"""Organisms: small causal language models trained here, and the long-context tasks that probe them.

``corpus`` (offline text from the Python installation), ``tokenizer`` (a byte-level BPE), ``tasks``
(generated retrieval and tracking tasks scored by exact match), ``train`` (a Llama-architecture model
from a ``transformers.LlamaConfig``; ``attnlab train``). Nothing is imported from ``transformers`` until a
function that needs it runs.
"""
