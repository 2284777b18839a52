"""SAEs: the registry of SAEs a user can bring (``registry``), training one with sae-lens
(``training``) and measuring its quality on held-out text (``quality``)."""
