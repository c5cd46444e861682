"""`kvray gallery`: its parser and handler live with the gallery, in kvray/gallery/command.py."""

from ..gallery.command import add_gallery_parser as add_parser

__all__ = ["add_parser"]
