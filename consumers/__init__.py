"""Sample consumers of the MMEmbeddingEvent stream (see the consumers issue)."""
