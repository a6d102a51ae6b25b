"""napari plugin (npe2 manifest `napari.yaml`): a reader and a writer for sparseseg's volumes and
OME-Zarr label images, and the "Sparse training" dock widget (paint, train, densify, retrain).

Installed with `pip install "sparseseg[napari]"`; nothing here is imported by the rest of
sparseseg, so napari and Qt stay optional."""
