"""Experiments: code that answered a question and is kept with its finding, not used by ``prune``.

Each module's docstring states what it measured and where the result lives
(``bench/results/``); nothing in the library's pipeline imports from here.
"""
