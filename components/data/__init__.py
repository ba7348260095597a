"""Images in, validated data out: built-in datasets, image facts, prepare (manifest and shards),
data checks and validation (Great Expectations). Imports core."""
