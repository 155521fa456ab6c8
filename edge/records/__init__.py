"""Result records in two public formats, one module each:

- ``edge.records.megadetector``: MegaDetector batch output 1.6 (image by image; Timelapse,
  AddaxAI), with the crash-safe appending writer the daemon and ``classify`` use.
- ``edge.records.camtrapdp``: Camtrap DP 1.0.2 (TDWG; what biologists publish), written from
  the ledger by ``camtrap-edge export-camtrapdp`` (edge/commands/records.py).
- ``edge.records.common``: the box convention and the person/vehicle classes both share.
"""
