"""Numerics of the Llama family: norms, rotary embeddings, tensor-parallel linears, attention."""
