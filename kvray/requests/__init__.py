"""What a user asks for, validated at the edge, torch-free: video requests, camera paths, and
manifest rows turned into requests with stable ids."""

from .request import VideoRequest

__all__ = ["VideoRequest"]
