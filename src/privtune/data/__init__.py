"""Raw data: ``download`` (official sources, or a clear error), ``readers`` (GLUE, E2E, DART layouts) and
``prep`` (the ``prepare_data`` rule's subsets)."""
