"""Evaluation, apart from training: IoU on annotated voxels, figures, the HTML report.

IoU = TP / (TP + FP + FN) over annotated voxels only is the paper's measure; the trainer's
validation and `sparseseg-eval` both use `metrics`."""
