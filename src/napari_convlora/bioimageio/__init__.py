"""BioImage Model Zoo packages: ``export`` writes one, ``architecture`` is the module copied into each package as
``bioimageio_model.py``, ``text`` holds its words (README, description, citations)."""
