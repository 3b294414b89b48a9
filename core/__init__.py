"""Plain-PyTorch models and machinery of the GLM-Image family; importable without ComfyUI.

Floors, from the ground up; every import points down (``tests/test_import_floors.py`` checks it):
cuda < runtime < formats < loading < models < convert < host < stages.
"""
