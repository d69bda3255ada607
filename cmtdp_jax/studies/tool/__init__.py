"""The study tool: `python -m cmtdp_jax.studies.tool` (see __main__.py)."""
