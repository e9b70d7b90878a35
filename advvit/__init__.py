"""advvit: adversarial training and evaluation of Vision Transformers on top of timm.

Importing the package stays light (torch only): ``advvit.attacks``, ``advvit.losses`` and
``advvit.schedules`` never import timm, torch-xla or tensorboard.
"""
from ._compat import guard_torchvision

guard_torchvision()

__version__ = "0.1.0"
