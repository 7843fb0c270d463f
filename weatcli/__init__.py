"""weat: robust classifiers as energy-based models (ECCV 2024), as one command-line tool."""

__version__ = "0.1.0"
