"""Kept for code written against earlier versions: building, saving and loading models is `mu.model.io`."""

from mu.model.io import *  # noqa: F401,F403
