"""The toy model's trained weights (kvray's converted format, half precision): the embedded default.

Made by `kvray train all` and `kvray train export --to kvray/toy_weights` (docs/training.md); `VERSION`
is their digest, which names them in video ids.
"""
