"""The data loop: label errors (`labels`), the review queue in Label Studio (`review`,
`label_studio`) and ingesting reviewed labels as a new data version (`ingest`)."""
