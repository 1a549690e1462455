"""Curation workflows: fitted reference statistics, target sets, prompt embeddings and the
`clipsql select` recipes."""
