"""tfds builders: synthetic_shapes (embedded, offline) and blip_json (BLIP annotation JSON)."""
