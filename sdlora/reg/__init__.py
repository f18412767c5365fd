"""Regularisers: the embedding-norm penalty and the drift probe."""
