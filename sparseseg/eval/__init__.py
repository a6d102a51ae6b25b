"""Evaluation, apart from training: IoU on annotated voxels (the paper's measure), the figures
and the HTML report of `sparseseg-eval`."""
