"""The clipsql store: Lance tables + a SQLAlchemy catalog (see store.store)."""
