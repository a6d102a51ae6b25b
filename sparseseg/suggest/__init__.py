"""Which slices to paint: representative slice selection (Zheng et al., AAAI 2020).

Every 2D slice of each requested plane is embedded (training-free filter-bank statistics, or
a small convolutional autoencoder trained on the volume's own slices), slices are compared by
cosine similarity, and greedy max-cover `F(S) = sum_j max_{i in S} sim(i, j)` orders them by
how much of the plane they add. The volume is read block by block, never whole.

    from sparseseg.suggest import suggest
    result = suggest("image.zarr", budget=5, planes=("xy", "xz", "yz"))
"""

from sparseseg.suggest.run import SuggestConfig, suggest

__all__ = ["SuggestConfig", "suggest"]
