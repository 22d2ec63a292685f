"""Data in: image folders, packed uint8 packs, MNIST IDX files, the distributed loader, uint8 -> [-1, 1]."""
