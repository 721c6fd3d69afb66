"""gkl: the Generalized Kullback-Leibler (GKL/DKL/IKL) loss of Cui et al. as a research tool."""

__version__ = "0.1.0"
