"""camtrap cascade, device wing: runs signed model bundles on a camera-trap box.

Never imports torch, ultralytics, pickle or the workstation wing (export/).
"""

__version__ = "0.1.0"
