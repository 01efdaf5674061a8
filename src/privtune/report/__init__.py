"""What a run of the pipeline reports: ``tables`` (the papers' layouts, published values beside ours),
``figures``, ``claims`` (each finding with a computed verdict) and ``provenance``."""
