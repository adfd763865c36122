"""Images larger than memory predicted block by block on dask: ``run`` (the entry, ``predict_blockwise``), the
blocks' tile plan (``tiles``), the intensity-range pass (``ranges``), instance ids made global (``instances``),
where the tasks run (``cluster``) and where workers get the model from (``worker_model``)."""
