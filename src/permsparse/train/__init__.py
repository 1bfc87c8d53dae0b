"""Learning the permutations: the bank of costs, the loop and its callbacks, the guard.

``bank`` (the costs of every site and the weights they give the model), ``loss`` (CE + α·KL),
``state`` (what a run holds), ``loop`` (the end-to-end trainer: one step, callbacks around
it), ``callbacks`` (averages, snapshots, progress, metrics, timing), ``checkpoint``
(resumable state), ``guard`` (the calibration loss of a plan), ``blockwise`` (the per-block
objective), ``optim`` (GroupAdam and the lr schedule), ``distributed`` (torch.distributed).
"""
