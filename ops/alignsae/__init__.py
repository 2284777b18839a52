"""AlignSAE: concept ontologies (``ontology``), post-training with concept slots (``training``),
its metrics (``metrics``) and concept swaps through the engine (``swaps``)."""
