"""rebase-ray: train small task experts with no task data (ReBase + BalDistill on Ray)."""

__version__ = "0.1.0"
