"""Side-by-side benchmarks of bnstats against its peers; run ``python benchmarks/run.py``.

Each comparison (``recalibration``, ``inference``, ``training_cost``, ``engine_speed``,
``estimator_accuracy``, ``shifted_data``, ``compiled``) measures its contenders alternately
in one process and returns a :class:`benchmarks.report.Result`: the measured numbers, the
tables the printer shows, and each goal with its verdict.

``run.py --device cuda`` runs a, b, c and g on a GPU; ``gpu_check.py`` checks there that no
training step or recalibration synchronizes the host with the device.
"""
