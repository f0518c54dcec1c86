"""SkinSense: a HAM10000 skin-lesion classifier that trains, registers and serves itself."""

__version__ = "0.1.0"
