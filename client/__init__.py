"""What runs on a device: base loading, personal adapters, local training, the SDK."""
