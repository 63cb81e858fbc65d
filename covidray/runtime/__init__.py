"""Where covidray meets Ray, and how many threads a process uses.

- :mod:`.threads`: the one thread policy (physical cores, shared by a node's workers); no Ray.
- :mod:`.cluster`: connecting to Ray (``ensure_ray``), the environment every worker gets
  (non-secret storage settings, allocator tunables), Ray tasks over chunks of work.
- :mod:`.train`: Ray Train runs (``fit_on_ray``), checkpoints and progress forwarding.
- :mod:`.jobs`: covidray commands as Ray jobs on a cluster (``covidray submit``, ``covidray
  jobs``): the Jobs API with Ray's token, runtime env without credentials, log following;
  :mod:`.config`: their options (no Ray).

The rest of the library is plain Python. Ray is imported only here and in the modules that are
Ray stages or drivers (the README's "Layout" lists them); importing this package imports no Ray.
"""
