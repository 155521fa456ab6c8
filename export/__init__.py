"""camtrap cascade, workstation wing: datasets, training, grouping, experts, bundles.

May import edge/ to reuse the manifest schema, decoding and the cascade, so that what is
evaluated here is exactly what the device runs.
"""

__version__ = "0.1.0"
