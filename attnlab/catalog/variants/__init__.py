"""Softmax variants (family ``dense``): a per-score transform, a normaliser or an output transform.

Importing this package registers its methods; each method is one module, imported below.
"""
# isort: skip_file
