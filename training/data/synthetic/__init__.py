"""The built-in synthetic indoor scenes: scene sampling, rendering (image, labels,
depth) and writing them as a `datasets` folder.
"""
