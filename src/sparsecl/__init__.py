"""sparsecl: continual learning with sparse subnetworks — prune, freeze, recycle; zero forgetting
verified bit for bit."""

__version__ = "0.1.0"
