"""The coordinator: Flower ServerApp, adapter registry, blob and base stores."""
