"""Latent scores for a topic (``scores``), coverage of latents by the pool (``coverage``) and the
top-k scoring check (``topk_check``)."""
