"""Launchers: where model-instance jobs run (Slurm CLI, slurmrestd, local processes).

All three implement :class:`control.launchers.base.Launcher`; everything above this package
(the Job Worker, the Endpoint Worker) codes against that Protocol only.
"""
