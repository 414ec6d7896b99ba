"""Bridges from other libraries to kda_compile's kernels (:mod:`kda_compile.integrations.transformers`)."""
