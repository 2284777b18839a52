"""The biography-QA task of AlignSAE (docs/algorithms.md §6): a seeded world of people with six
relations (``world``), and a small causal LM trained from scratch to answer questions about them
(``lm``: word-level tokenizer, GPT-2 config, cached by fingerprint, exact-match evaluation)."""
