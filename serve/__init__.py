"""clipsql serve: the SQL endpoint and the curation app over one store."""
