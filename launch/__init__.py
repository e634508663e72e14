"""Operational tools that drive the training job from outside (``python -m launch.chaos``)."""
