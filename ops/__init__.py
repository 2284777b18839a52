"""Operators: the compute building blocks of saealign (models, SAEs, embeddings, summaries,
scoring, interventions, metrics). Nothing here imports Ray; ``workflows`` wires these into jobs."""

__version__ = "0.1.0"
