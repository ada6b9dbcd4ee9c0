"""The baseline freezing policies (installed as ``freezebench.baselines``).

Each module holds one policy: a pure core (a schedule or a score function, tested on its own) and a thin
:class:`freezebench.policy.FreezePolicy` subclass whose docstring is its method card. Policies are found
through the ``freezebench.policies`` entry-point group, declared in ``pyproject.toml``.
"""
