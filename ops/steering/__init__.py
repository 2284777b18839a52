"""Everything at a hook: the one intervention engine (``engine``: every edit of the model),
reading activations through it (``activations``) and steered generation (``generation``:
KV-cached decode, per-row specs and seeds)."""
