"""Generation over compiled programs and loaded artifacts (no transformers model code needed)."""
