"""The steps of a prune, below the public entry points of :mod:`permsparse.api`:
calibrating and scoring once (:mod:`~permsparse.pipeline.calibration`) and the block-by-block
walk (:mod:`~permsparse.pipeline.blockwise`)."""
