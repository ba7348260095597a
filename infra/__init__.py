"""Servers and deployment: the local stack (stack.py)."""
