"""Methods: one LightningModule per method, thin (stages, losses, optimisers)."""
