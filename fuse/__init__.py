"""Stage two: the HADA graph fusion, trained from the feature cache; fused embeddings for scoring."""
