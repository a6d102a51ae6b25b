"""Self-training from sparse labels (Zheng et al. 2020): base networks trained on the sparse
labels (a 2D network on slices of every usable plane, the sparse 3D network) predict soft
pseudo-labels, which train the final network.

  config.py   SelfTrainConfig, parsed once at the edge
  planes.py   transposed views that make each plane the z axis, and which planes a 2D net can use
  base.py     training the two base networks with the ordinary trainer
  pseudo.py   averaged soft pseudo-labels through the engine, and dense targets from them
  blockwise.py  pseudo-labels of volumes read lazily, block-wise through the engine
  distill.py  the distillation variant: one plain 3D network trained on the dense pseudo-labels
  meta.py     the meta-model variant (Zheng): its training loop with per-iteration targets
  compose.py  base networks + meta-network as one module (shape arithmetic for the engine)
  export.py   that module as one ONNX engine file
  run.py      the whole procedure, as `sparseseg-train --self-train` and `densify` call it
"""
