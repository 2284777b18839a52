"""The one intervention engine (``engine``: every edit of the model at a hook) and steered
generation through it (``generation``: KV-cached decode, per-row specs and seeds)."""
