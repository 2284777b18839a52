"""Models: the language-model registry (``lm``), sentence embedders (``embedders``) and reading a
model's activations at a hook (``activations``)."""
