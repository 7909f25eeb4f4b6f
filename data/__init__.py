"""Everything on disk that the stages share: dataset readers, split indexes, the feature store."""
