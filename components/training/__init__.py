"""Models and how they learn: architectures, pretrained weights, the recipe, the training loop
(single and multi-process), augmentation, the train step and its sanity checks (doctor).
Imports core and data."""
