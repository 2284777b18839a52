"""The Parquet lake: its data contract (``contract``: schemas, names, paths, atomic writes), the
per-shard compute behind build-lake (``build``, ``summaries``) and read-only SQL over it (``query``)."""
