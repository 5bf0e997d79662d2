"""Helpers the tests import (`from support.data import ...`): real-data subsets, a tiny
in-process model, synthetic images. Fixtures live in conftest.py."""
