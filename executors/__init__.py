"""Executors: where the work of a batch runs.

``--executor local`` (the default) runs every job in this process, one after another
(``actsparse.pipeline.jobs``, ``actsparse.analyze``). ``--executor ray`` runs the same work on a Ray cluster,
writing the same bytes: collection jobs on worker actors that keep their model loaded (``ray_collect``,
``ray_worker``), curves per layer and statistics per shard in Ray tasks (``ray_analysis``); connecting to Ray,
or starting a local instance, is ``ray_session``. Ray is the optional extra ``actsparse[ray]``.
"""
