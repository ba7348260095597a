"""Continuous validation: one monitoring pass over a batch of new images and how that batch is
read. Imports every package before it (core .. evaluation)."""
