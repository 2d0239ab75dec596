"""Training of the covidseg U-Net: dataset index and split, augmentation, the training loop."""
