"""Models: the language-model registry (``lm``: the HF model and its TransformerLens twin) and
sentence embedders (``embedders``)."""
