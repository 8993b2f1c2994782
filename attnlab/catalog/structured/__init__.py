"""Structured static patterns (family ``static``): neighborhoods, strided, power-law, radial, multi-axis.

They use the static family's backends (:data:`attnlab.catalog.static.MASK_BACKENDS`). Importing this
package registers its methods; each method is one module, imported below.
"""
# isort: skip_file
