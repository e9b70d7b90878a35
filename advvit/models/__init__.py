"""Models: the thesis variants, FAN and the conv-mixing ViTs, registered in timm on import."""
from . import covit, fan, thesis
from .thesis import *  # noqa: F401,F403
from .thesis import count_parameters, iter_registered  # noqa: F401

__all__ = thesis.__all__
