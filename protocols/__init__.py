"""The contract client and server share: adapter specs, seeds, encodings."""
