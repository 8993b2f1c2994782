"""Linear and gated-recurrent attention (family ``linear``): a recurrence, its chunked executor, state in/out.

Importing this package registers its methods; each method is one module, imported below.
"""
# isort: skip_file
