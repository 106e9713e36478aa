"""featcodec HTTP service: a thin FastAPI layer over the ``codec`` library."""
