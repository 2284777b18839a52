"""Jobs: thin Ray wiring around ``ops``; one module per job, each a config + ``build`` + ``main``."""
