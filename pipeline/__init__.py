"""Writing stores: models, their FFN sites, corpora and token windows, collection, and the store reader."""
