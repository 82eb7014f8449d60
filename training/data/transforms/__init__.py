"""Augmentations: the two-view SimCLR policy of pre-training (`two_view`), the colour
operations it shares with the dense tasks (`colour`), and the joint image/target augmentations of
segmentation and depth (`dense`).
"""
