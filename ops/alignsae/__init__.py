"""AlignSAE: concept ontologies (``ontology``), post-training with concept slots (``training``),
its metrics (``metrics``), concept swaps through the engine (``swaps``) and the protocol that
runs them in order (``protocol``)."""
