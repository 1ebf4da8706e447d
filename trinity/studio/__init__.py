"""``trinity studio``: a local web app to look at runs: their curves, rollouts and configs.

``app.create_app(root)`` is the FastAPI app (``trinity.cli.studio`` serves it); ``runs`` reads
the runs under the root through ``JobDir``, the monitor's readers and the rollout store.
"""
