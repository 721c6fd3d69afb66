"""The training engine shared by adversarial training (`gkl train-at`) and distillation.

`engine.Engine` owns the loop, checkpoints, resume, DDP, AMP, logging and evaluation; a *step*
(`at.AdversarialStep`, later a distillation step) computes each batch's loss.
"""
