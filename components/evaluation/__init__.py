"""The evaluate step (metrics, figures) and evaluating any model URI on any folder.
Imports every package before it (core .. release)."""
